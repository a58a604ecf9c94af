// Python module nreft_engine._C: the block manager, the CPU/CUDA cache ops and the CPU kernels.
#include <torch/extension.h>

#include "block_manager.h"
#include "cache_ops.h"
#include "cpu_kernels.h"

namespace py = pybind11;
using nreft::BlockManager;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nreft-engine native ops: paged KV block manager and cache ops";
  // std::invalid_argument -> ValueError and std::runtime_error -> RuntimeError come from pybind11.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const nreft::UnknownSequence& e) {
      PyErr_SetString(PyExc_KeyError, e.what());
    }
  });

  py::class_<BlockManager>(m, "BlockManager",
                           "Block tables, ref counts, copy-on-write and free list of the paged KV cache.")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def("can_allocate", &BlockManager::can_allocate, py::arg("num_tokens"))
      .def("allocate", &BlockManager::allocate, py::arg("seq_id"), py::arg("num_tokens"),
           "Give a new sequence ceil(num_tokens / block_size) blocks.")
      .def("can_append", &BlockManager::can_append, py::arg("seq_id"))
      .def("append_slot", &BlockManager::append_slot, py::arg("seq_id"),
           "Reserve one more token; returns (slot, [(src_block, dst_block), ...] copies to do first).")
      .def("fork", &BlockManager::fork, py::arg("parent_id"), py::arg("child_id"),
           "The child shares the parent's blocks (ref counts +1).")
      .def("free", &BlockManager::free, py::arg("seq_id"))
      .def("block_table", &BlockManager::block_table, py::arg("seq_id"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def("ref_count", &BlockManager::ref_count, py::arg("block_id"))
      .def("has_sequence", &BlockManager::has_sequence, py::arg("seq_id"))
      .def("slot_mapping", &BlockManager::slot_mapping, py::arg("seq_id"), py::arg("start"), py::arg("end"),
           "int64 slots of token positions [start, end).")
      .def("block_tables", &BlockManager::block_tables, py::arg("seq_ids"), py::arg("width"),
           "int32 [len(seq_ids), width] block tables, rows padded with 0.")
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_used_blocks", &BlockManager::num_used_blocks)
      .def_property_readonly("num_sequences", &BlockManager::num_sequences);

  m.def("copy_blocks", &nreft::copy_blocks, py::arg("k_cache"), py::arg("v_cache"), py::arg("src_dst"),
        "Copy block src to dst in every layer of [L, num_blocks, block_size, KVH, D] caches.");
#ifdef NREFT_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif

  // CPU kernels of the decode step (csrc/cpu_kernels.h; Python wrappers in kernels/cpu.py)
  m.def("paged_decode_attention_cpu", &nreft::paged_decode_attention_cpu, py::arg("q"), py::arg("k_cache_layer"),
        py::arg("v_cache_layer"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("out") = py::none(), "Paged decode attention, q [B, H, D] over the block tables; returns [B, H, D].");
  m.def("rms_norm_cpu", &nreft::rms_norm_cpu, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("residual") = py::none(), py::arg("out") = py::none(),
        "weight * rmsnorm(x [+ residual]) over the last dim; the sum is written into residual. Returns y.");
  m.def("silu_and_mul_cpu", &nreft::silu_and_mul_cpu, py::arg("gate"), py::arg("up"), py::arg("out") = py::none(),
        "silu(gate) * up.");
  m.def("rope_write_kv_cpu", &nreft::rope_write_kv_cpu, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("positions"), py::arg("cos"), py::arg("sin"), py::arg("k_cache_layer"), py::arg("v_cache_layer"),
        py::arg("slot_mapping"), py::arg("q_out") = py::none(), py::arg("k_out") = py::none(),
        "RoPE on q, k; rotated k and v written into the caches at slot_mapping (< 0 skips). Returns (q_rot, k_rot).");
  m.def("sample_cpu", &nreft::sample_cpu, py::arg("logits"), py::arg("temperature"), py::arg("top_k"),
        py::arg("top_p"), py::arg("min_p"), py::arg("uniform"), py::arg("softmax_lanes"),
        "Temperature / top-k / top-p / min-p, inverse-CDF sampling with the given uniforms: (tokens, logprobs).");
  m.def("pack_rows16", &nreft::pack_rows16, py::arg("weight"),
        "weight [N, K] copied into [ceil(N / 16), K, 16] (rows in blocks of 16) for linear_rows16_cpu.");
  m.def("linear_rows16_cpu", &nreft::linear_rows16_cpu, py::arg("x"), py::arg("packed"), py::arg("bias"),
        py::arg("out_features"), "x @ W.T + bias with W packed by pack_rows16: the small-batch linear.");
  m.def("cpu_isa", &nreft::cpu_isa, "Instruction set the CPU kernels run: avx512, avx2 or base.");
  m.def("set_cpu_isa", &nreft::set_cpu_isa, py::arg("isa"),
        "Run the CPU kernels with avx512, avx2 or base code ('' = the best this CPU supports).");
}
