#include "block_manager.h"

#include <algorithm>

namespace nreft {
namespace {

std::string str(int64_t v) { return std::to_string(v); }

}  // namespace

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX)
    throw std::invalid_argument("num_blocks must be in [1, 2^31), got " + str(num_blocks));
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive, got " + str(block_size));
  ref_counts_.assign(num_blocks, 0);
  free_list_.resize(num_blocks);
  for (int64_t i = 0; i < num_blocks; ++i) free_list_[i] = static_cast<int32_t>(num_blocks - 1 - i);
}

const BlockManager::Sequence& BlockManager::get(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownSequence("unknown sequence id " + str(seq_id));
  return it->second;
}

int64_t BlockManager::blocks_for(int64_t num_tokens) const {
  if (num_tokens <= 0) throw std::invalid_argument("num_tokens must be positive, got " + str(num_tokens));
  return num_tokens / block_size_ + (num_tokens % block_size_ != 0);  // ceil without overflow
}

// A new block is needed when the last block is full, or when it is partial but shared (copy-on-write).
bool BlockManager::append_needs_block(const Sequence& seq) const {
  return seq.num_tokens % block_size_ == 0 || ref_counts_[seq.blocks.back()] > 1;
}

int32_t BlockManager::take_block() {
  int32_t block = free_list_.back();
  free_list_.pop_back();
  ref_counts_[block] = 1;
  return block;
}

void BlockManager::drop_ref(int32_t block) {
  if (--ref_counts_[block] == 0) free_list_.push_back(block);
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  return blocks_for(num_tokens) <= num_free_blocks();
}

void BlockManager::allocate(int64_t seq_id, int64_t num_tokens) {
  if (has_sequence(seq_id)) throw std::invalid_argument("sequence id " + str(seq_id) + " already exists");
  int64_t needed = blocks_for(num_tokens);
  if (needed > num_free_blocks())
    throw std::runtime_error("out of blocks: sequence " + str(seq_id) + " needs " + str(needed) +
                             " blocks for " + str(num_tokens) + " tokens, " + str(num_free_blocks()) +
                             " free");
  Sequence seq{{}, num_tokens};
  seq.blocks.reserve(needed);
  for (int64_t i = 0; i < needed; ++i) seq.blocks.push_back(take_block());
  seqs_.emplace(seq_id, std::move(seq));
}

bool BlockManager::can_append(int64_t seq_id) const {
  return !append_needs_block(get(seq_id)) || num_free_blocks() > 0;
}

std::pair<int64_t, std::vector<BlockCopy>> BlockManager::append_slot(int64_t seq_id) {
  Sequence& seq = const_cast<Sequence&>(get(seq_id));
  std::vector<BlockCopy> copies;
  if (append_needs_block(seq)) {
    if (free_list_.empty())
      throw std::runtime_error("out of blocks: sequence " + str(seq_id) + " needs 1 block to append, 0 free");
    int32_t block = take_block();
    if (seq.num_tokens % block_size_ == 0) {
      seq.blocks.push_back(block);
    } else {  // copy-on-write of the shared partial last block
      int32_t old = seq.blocks.back();
      copies.emplace_back(old, block);
      drop_ref(old);  // still referenced by the other sharers: ref count stays >= 1
      seq.blocks.back() = block;
    }
  }
  int64_t slot = int64_t{seq.blocks.back()} * block_size_ + seq.num_tokens % block_size_;
  ++seq.num_tokens;
  return {slot, std::move(copies)};
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
  const Sequence& parent = get(parent_id);
  if (has_sequence(child_id)) throw std::invalid_argument("sequence id " + str(child_id) + " already exists");
  for (int32_t block : parent.blocks) ++ref_counts_[block];
  Sequence child = parent;  // copy before emplace: emplace may rehash and move the parent
  seqs_.emplace(child_id, std::move(child));
}

void BlockManager::free(int64_t seq_id) {
  for (int32_t block : get(seq_id).blocks) drop_ref(block);
  seqs_.erase(seq_id);
}

std::vector<int32_t> BlockManager::block_table(int64_t seq_id) const { return get(seq_id).blocks; }

int64_t BlockManager::num_tokens(int64_t seq_id) const { return get(seq_id).num_tokens; }

int64_t BlockManager::ref_count(int64_t block_id) const {
  if (block_id < 0 || block_id >= num_blocks_)
    throw std::invalid_argument("block id " + str(block_id) + " out of range [0, " + str(num_blocks_) + ")");
  return ref_counts_[block_id];
}

at::Tensor BlockManager::slot_mapping(int64_t seq_id, int64_t start, int64_t end) const {
  const Sequence& seq = get(seq_id);
  if (start < 0 || start > end || end > seq.num_tokens)
    throw std::invalid_argument("token range [" + str(start) + ", " + str(end) + ") out of bounds for sequence " +
                                str(seq_id) + " of " + str(seq.num_tokens) + " tokens");
  auto out = at::empty({end - start}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t i = start; i < end; ++i)
    p[i - start] = int64_t{seq.blocks[i / block_size_]} * block_size_ + i % block_size_;
  return out;
}

at::Tensor BlockManager::block_tables(const std::vector<int64_t>& seq_ids, int64_t width) const {
  if (width < 0) throw std::invalid_argument("width must be >= 0, got " + str(width));
  std::vector<const Sequence*> rows;
  rows.reserve(seq_ids.size());
  for (int64_t id : seq_ids) {
    rows.push_back(&get(id));
    if (static_cast<int64_t>(rows.back()->blocks.size()) > width)
      throw std::invalid_argument("width " + str(width) + " is smaller than the " +
                                  str(rows.back()->blocks.size()) + " blocks of sequence " + str(id));
  }
  auto out = at::zeros({static_cast<int64_t>(rows.size()), width}, at::kInt);
  int32_t* p = out.data_ptr<int32_t>();
  for (size_t r = 0; r < rows.size(); ++r) std::copy(rows[r]->blocks.begin(), rows[r]->blocks.end(), p + r * width);
  return out;
}

}  // namespace nreft
