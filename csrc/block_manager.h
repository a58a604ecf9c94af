// Block manager for the paged KV cache: per-sequence block tables, block ref counts (prompt forks share
// blocks), copy-on-write of a shared partial last block, and a free list. Every method validates its
// arguments before changing anything, so a failed call leaves the manager exactly as it was.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace nreft {

// Raised for an unknown sequence id; the bindings translate it to Python's KeyError.
struct UnknownSequence : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using BlockCopy = std::pair<int64_t, int64_t>;  // (src block, dst block)

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size);

  bool can_allocate(int64_t num_tokens) const;
  void allocate(int64_t seq_id, int64_t num_tokens);
  bool can_append(int64_t seq_id) const;
  // Room for one more token: returns its slot and the block copies (copy-on-write) to perform first.
  std::pair<int64_t, std::vector<BlockCopy>> append_slot(int64_t seq_id);
  void fork(int64_t parent_id, int64_t child_id);
  void free(int64_t seq_id);

  std::vector<int32_t> block_table(int64_t seq_id) const;
  int64_t num_tokens(int64_t seq_id) const;
  int64_t ref_count(int64_t block_id) const;
  bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) > 0; }
  at::Tensor slot_mapping(int64_t seq_id, int64_t start, int64_t end) const;
  at::Tensor block_tables(const std::vector<int64_t>& seq_ids, int64_t width) const;

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_list_.size()); }
  int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }

 private:
  struct Sequence {
    std::vector<int32_t> blocks;
    int64_t num_tokens;
  };

  const Sequence& get(int64_t seq_id) const;
  int64_t blocks_for(int64_t num_tokens) const;
  bool append_needs_block(const Sequence& seq) const;
  int32_t take_block();
  void drop_ref(int32_t block);

  int64_t num_blocks_;
  int64_t block_size_;
  std::unordered_map<int64_t, Sequence> seqs_;
  std::vector<int32_t> ref_counts_;  // per block; 0 means free
  std::vector<int32_t> free_list_;   // a stack: the lowest ids are handed out first on a fresh manager
};

}  // namespace nreft
