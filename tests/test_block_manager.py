"""nreft_engine._C.BlockManager: unit tests of every method, misuse that must leave state unchanged, and a
hypothesis state machine against a pure-Python model (no leaks, no double frees, balanced ref counts)."""

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nreft_engine import _C


def snapshot(bm):
    """Everything observable about a manager, to check that a failed call changed nothing."""
    seqs = [s for s in range(-5, 50) if bm.has_sequence(s)]
    return (
        bm.num_free_blocks,
        bm.num_sequences,
        [bm.ref_count(b) for b in range(bm.num_blocks)],
        {s: (bm.block_table(s), bm.num_tokens(s)) for s in seqs},
    )


def test_allocate_tables_and_slots():
    bm = _C.BlockManager(8, 4)
    assert (bm.num_blocks, bm.block_size, bm.num_free_blocks, bm.num_used_blocks) == (8, 4, 8, 0)
    assert bm.can_allocate(32) and not bm.can_allocate(33)
    bm.allocate(7, 6)
    assert bm.has_sequence(7) and not bm.has_sequence(8)
    assert bm.block_table(7) == [0, 1] and bm.num_tokens(7) == 6
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_sequences) == (6, 2, 1)
    assert bm.ref_count(0) == bm.ref_count(1) == 1 and bm.ref_count(2) == 0
    sm = bm.slot_mapping(7, 0, 6)
    assert sm.dtype == torch.int64 and sm.tolist() == [0, 1, 2, 3, 4, 5]
    assert bm.slot_mapping(7, 3, 5).tolist() == [3, 4] and bm.slot_mapping(7, 6, 6).numel() == 0
    bm.allocate(8, 4)
    table = bm.block_tables([8, 7], 3)
    assert table.dtype == torch.int32 and table.tolist() == [[2, 0, 0], [0, 1, 0]]
    assert bm.block_tables([], 3).shape == (0, 3)


def test_append_fills_partial_block_then_takes_new_one():
    bm = _C.BlockManager(4, 4)
    bm.allocate(0, 3)
    assert bm.can_append(0) and bm.append_slot(0) == (3, [])
    assert bm.num_tokens(0) == 4 and bm.num_free_blocks == 3
    assert bm.append_slot(0) == (4, [])  # last block full: new block 1, offset 0
    assert bm.block_table(0) == [0, 1] and bm.num_free_blocks == 2


def test_copy_on_write_of_shared_partial_block():
    bm = _C.BlockManager(6, 4)
    bm.allocate(0, 6)  # blocks [0, 1], block 1 holds 2 tokens
    bm.fork(0, 1)
    assert bm.block_table(1) == [0, 1] and bm.num_tokens(1) == 6
    assert bm.ref_count(0) == bm.ref_count(1) == 2 and bm.num_used_blocks == 2
    slot, copies = bm.append_slot(1)
    assert copies == [(1, 2)] and slot == 2 * 4 + 2
    assert bm.block_table(1) == [0, 2] and bm.block_table(0) == [0, 1]
    assert (bm.ref_count(0), bm.ref_count(1), bm.ref_count(2)) == (2, 1, 1)
    assert bm.append_slot(0) == (1 * 4 + 2, [])  # the parent now owns block 1 alone: no copy


def test_shared_full_last_block_takes_new_block_without_copy():
    bm = _C.BlockManager(4, 2)
    bm.allocate(0, 4)
    bm.fork(0, 1)
    assert bm.append_slot(1) == (4, []) and bm.block_table(1) == [0, 1, 2]
    assert bm.ref_count(1) == 2


def test_fork_n8_of_three_and_a_half_block_prompt():
    bm = _C.BlockManager(32, 4)
    bm.allocate(100, 14)  # 3 full blocks + 2 tokens
    for child in range(8):
        bm.fork(100, child)
    bm.free(100)
    assert [bm.ref_count(b) for b in range(4)] == [8, 8, 8, 8] and bm.num_used_blocks == 4
    copies = [bm.append_slot(child)[1] for child in range(8)]
    # The first 7 appends copy the shared partial block; the last child then owns it alone.
    assert all(len(c) == 1 and c[0][0] == 3 for c in copies[:7]) and copies[7] == []
    assert [bm.ref_count(b) for b in range(3)] == [8, 8, 8] and bm.ref_count(3) == 1
    assert bm.num_used_blocks == 3 + 8
    for child in range(8):
        bm.free(child)
    assert bm.num_free_blocks == 32 and bm.num_sequences == 0
    assert all(bm.ref_count(b) == 0 for b in range(32))


def test_free_returns_blocks_only_when_unreferenced():
    bm = _C.BlockManager(4, 4)
    bm.allocate(0, 8)
    bm.fork(0, 1)
    bm.free(0)
    assert bm.num_free_blocks == 2 and bm.ref_count(0) == 1 and not bm.has_sequence(0)
    bm.free(1)
    assert bm.num_free_blocks == 4


def test_out_of_blocks_on_append():
    bm = _C.BlockManager(2, 2)
    bm.allocate(0, 2)
    bm.allocate(1, 2)
    assert not bm.can_append(0)
    before = snapshot(bm)
    with pytest.raises(RuntimeError, match="out of blocks"):
        bm.append_slot(0)
    assert snapshot(bm) == before


def test_out_of_blocks_on_copy_on_write():
    bm = _C.BlockManager(1, 4)
    bm.allocate(0, 1)
    bm.fork(0, 1)
    assert not bm.can_append(1)
    before = snapshot(bm)
    with pytest.raises(RuntimeError, match="out of blocks"):
        bm.append_slot(1)
    assert snapshot(bm) == before


@pytest.mark.parametrize("args", [(0, 4), (-1, 4), (4, 0), (4, -2), (2**31, 4)])
def test_bad_constructor_arguments(args):
    with pytest.raises(ValueError):
        _C.BlockManager(*args)


MISUSE = [
    (lambda bm: bm.allocate(1, 4), ValueError, "already exists"),
    (lambda bm: bm.allocate(5, 0), ValueError, "num_tokens"),
    (lambda bm: bm.allocate(5, -3), ValueError, "-3"),
    (lambda bm: bm.allocate(5, 100), RuntimeError, "out of blocks"),
    (lambda bm: bm.can_allocate(0), ValueError, "num_tokens"),
    (lambda bm: bm.append_slot(9), KeyError, "9"),
    (lambda bm: bm.can_append(9), KeyError, "9"),
    (lambda bm: bm.fork(9, 5), KeyError, "9"),
    (lambda bm: bm.fork(1, 2), ValueError, "already exists"),
    (lambda bm: bm.fork(1, 1), ValueError, "already exists"),
    (lambda bm: bm.free(9), KeyError, "9"),
    (lambda bm: bm.block_table(9), KeyError, "9"),
    (lambda bm: bm.num_tokens(9), KeyError, "9"),
    (lambda bm: bm.ref_count(8), ValueError, "block id 8"),
    (lambda bm: bm.ref_count(-1), ValueError, "block id -1"),
    (lambda bm: bm.slot_mapping(9, 0, 1), KeyError, "9"),
    (lambda bm: bm.slot_mapping(1, 0, 7), ValueError, r"\[0, 7\)"),
    (lambda bm: bm.slot_mapping(1, -1, 2), ValueError, "out of bounds"),
    (lambda bm: bm.slot_mapping(1, 3, 2), ValueError, "out of bounds"),
    (lambda bm: bm.block_tables([1, 9], 4), KeyError, "9"),
    (lambda bm: bm.block_tables([1], 1), ValueError, "width 1"),
    (lambda bm: bm.block_tables([], -1), ValueError, "width"),
]


@pytest.mark.parametrize("call, exc, match", MISUSE)
def test_misuse_raises_and_changes_nothing(call, exc, match):
    bm = _C.BlockManager(8, 4)
    bm.allocate(1, 6)
    bm.fork(1, 2)
    before = snapshot(bm)
    with pytest.raises(exc, match=match):
        call(bm)
    assert snapshot(bm) == before


class Model:
    """Pure-Python block manager with the same policy: LIFO free list, lowest ids first when fresh."""

    def __init__(self, num_blocks, block_size):
        self.bs = block_size
        self.free = list(range(num_blocks))[::-1]
        self.refs = [0] * num_blocks
        self.seqs = {}  # id -> [blocks, num_tokens]

    def take(self):
        block = self.free.pop()
        self.refs[block] = 1
        return block

    def drop(self, block):
        assert self.refs[block] > 0, "double free"
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)

    def allocate(self, sid, n):
        self.seqs[sid] = [[self.take() for _ in range(-(-n // self.bs))], n]

    def needs_block(self, sid):
        blocks, n = self.seqs[sid]
        return n % self.bs == 0 or self.refs[blocks[-1]] > 1

    def append(self, sid):
        seq = self.seqs[sid]
        blocks, n = seq
        copies = []
        if n % self.bs == 0:
            blocks.append(self.take())
        elif self.refs[blocks[-1]] > 1:
            new = self.take()
            copies.append((blocks[-1], new))
            self.drop(blocks[-1])
            blocks[-1] = new
        seq[1] += 1
        return blocks[n // self.bs] * self.bs + n % self.bs, copies

    def fork(self, parent, child):
        blocks, n = self.seqs[parent]
        for b in blocks:
            self.refs[b] += 1
        self.seqs[child] = [list(blocks), n]

    def release(self, sid):
        for b in self.seqs.pop(sid)[0]:
            self.drop(b)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 3, 4]))
    def setup(self, num_blocks, block_size):
        self.bm = _C.BlockManager(num_blocks, block_size)
        self.model = Model(num_blocks, block_size)
        self.next_id = 0

    def new_id(self):
        self.next_id += 1
        return self.next_id

    @rule(n=st.integers(1, 20))
    def allocate(self, n):
        sid = self.new_id()
        fits = -(-n // self.model.bs) <= len(self.model.free)
        assert self.bm.can_allocate(n) == fits
        if fits:
            self.bm.allocate(sid, n)
            self.model.allocate(sid, n)
        else:
            with pytest.raises(RuntimeError):
                self.bm.allocate(sid, n)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def append(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model.seqs)))
        fits = not self.model.needs_block(sid) or bool(self.model.free)
        assert self.bm.can_append(sid) == fits
        if fits:
            assert self.bm.append_slot(sid) == self.model.append(sid)
        else:
            with pytest.raises(RuntimeError):
                self.bm.append_slot(sid)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.model.seqs)))
        child = self.new_id()
        self.bm.fork(parent, child)
        self.model.fork(parent, child)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model.seqs)))
        self.bm.free(sid)
        self.model.release(sid)
        with pytest.raises(KeyError):
            self.bm.free(sid)  # a second free of the same sequence is refused

    @invariant()
    def matches_model(self):
        bm, model = self.bm, self.model
        referenced = {b for blocks, _ in model.seqs.values() for b in blocks}
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        assert bm.num_used_blocks == len(referenced) == bm.num_blocks - len(model.free)
        assert len(set(model.free)) == len(model.free) and not referenced & set(model.free)
        assert [bm.ref_count(b) for b in range(bm.num_blocks)] == model.refs
        assert bm.num_sequences == len(model.seqs)
        for sid, (blocks, n) in model.seqs.items():
            assert bm.block_table(sid) == blocks and bm.num_tokens(sid) == n
            assert bm.slot_mapping(sid, 0, n).tolist() == [
                blocks[i // model.bs] * model.bs + i % model.bs for i in range(n)
            ]
        if model.seqs:
            ids = sorted(model.seqs)
            width = max(len(model.seqs[s][0]) for s in ids)
            rows = [model.seqs[s][0] + [0] * (width - len(model.seqs[s][0])) for s in ids]
            assert bm.block_tables(ids, width).tolist() == rows


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_manager_matches_model = BlockManagerMachine.TestCase
