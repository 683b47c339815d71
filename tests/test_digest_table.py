"""The owner's digest table (roles/dedup.py) on random digests: claims with repeats inside them, references that
wait for an embedding and are filled when it is made, and the memory bound."""
from __future__ import annotations

import numpy as np
import pytest

from hpcembed.roles.dedup import PENDING, DigestTable


def _digests(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 16), dtype=np.uint8)


def test_owner_table_claims_references_and_fills():
    rng = np.random.default_rng(9)
    table = DigestTable(memory_bytes=1 << 30)
    digests = _digests(rng, 100)
    claim = np.concatenate([digests[:60], digests[:10]])          # ten repeated inside the claim
    flags = table.claim(claim.tobytes())
    assert flags.tolist() == [1] * 60 + [0] * 10
    assert table.claim(digests[50:100].tobytes()).tolist() == [0] * 10 + [1] * 40
    # References to digests not yet embedded wait; embedding them fills the references.
    filled = table.references(3, ["a", "b"], [7, 8], digests[[5, 6]].tobytes())
    assert filled.ids == [] and len(table.waiting) == 2
    embeddings = rng.random((100, 4)).astype(np.float32)
    done = table.encoded(digests, embeddings)
    assert [(f.unit, f.ids, f.rows.tolist()) for f in done] == [(3, ["a", "b"], [7, 8])]
    np.testing.assert_array_equal(table.embeddings(done[0].slots), embeddings[[5, 6]])
    later = table.references(4, ["c"], [1], digests[[99]].tobytes())
    np.testing.assert_array_equal(table.embeddings(later.slots), embeddings[[99]])
    assert table.rows_deduplicated == 3 and table.slots[digests[0].tobytes()] != PENDING


def test_a_full_table_answers_first_for_every_unrecorded_digest():
    rng = np.random.default_rng(11)
    table = DigestTable(memory_bytes=10 * (160 + 4096))           # ten digests before the width is known
    digests = _digests(rng, 30)
    flags = table.claim(np.concatenate([digests, digests]).tobytes())
    assert table.full and flags[:30].all() and flags[30:40].sum() == 0 and flags[40:].all()


def test_a_full_table_keeps_only_the_digests_it_recorded():
    """Once full, a batch can hold rows whose digests went unrecorded: only the recorded ones get a slot."""
    rng = np.random.default_rng(13)
    table = DigestTable(memory_bytes=10 * (160 + 4096))
    digests = _digests(rng, 30)
    table.claim(digests.tobytes())                                # the first ten recorded, then full
    embeddings = rng.random((30, 4)).astype(np.float32)
    assert table.full and table.encoded(digests, embeddings) == []
    assert len(table.slots) == 10 and all(table.slots[d.tobytes()] != PENDING for d in digests[:10])
    filled = table.references(0, ["x"], [0], digests[[3]].tobytes())
    np.testing.assert_array_equal(table.embeddings(filled.slots), embeddings[[3]])


def test_dedup_links_every_tokenizer_to_every_owner():
    from hpcembed.topology import RoleMap
    roles = RoleMap(0, [1, 2, 3], list(range(4, 24)), {r: f"host{r % 3}" for r in range(24)})
    assert max(len(roles.encoders_of(t)) for t in roles.tokenizers) == roles.fanout < 20
    linked = roles.linked_to_all()
    assert all(sorted(linked.encoders_of(t)) == linked.encoders for t in linked.tokenizers)
    assert all(sorted(linked.tokenizers_of(e)) == [1, 2, 3] for e in linked.encoders)


def test_reused_float16_beside_float32_keeps_float32_exact():
    rng = np.random.default_rng(3)
    table = DigestTable(memory_bytes=1 << 30)
    old, new = _digests(rng, 5), _digests(rng, 5)
    table.load(old, rng.random((5, 4)).astype(np.float16))
    assert table.claim(new.tobytes()).all()
    made = rng.random((5, 4)).astype(np.float32)
    table.encoded(new, made)
    filled = table.references(1, list("abcde"), [0, 1, 2, 3, 4], new.tobytes())
    np.testing.assert_array_equal(table.embeddings(filled.slots), made)
    assert table.rows_deduplicated == 5 and table.rows_reused == 0


def test_embeddings_kept_across_blocks_come_back_exact(monkeypatch):
    """Batches of uneven sizes fill blocks of 8 rows (the real ones hold 16,384) and straddle them; a gather over
    rows spread across every block, in any order, returns each row's own embedding."""
    import hpcembed.roles.dedup as dedup
    monkeypatch.setattr(dedup, "BLOCK_ROWS", 8)
    rng = np.random.default_rng(5)
    table = DigestTable(memory_bytes=1 << 30)
    digests = _digests(rng, 61)
    assert table.claim(digests.tobytes()).all()
    made = rng.random((61, 3)).astype(np.float32)
    for start, stop in ((0, 5), (5, 6), (6, 30), (30, 61)):
        table.encoded(digests[start:stop], made[start:stop])
    order = rng.permutation(61)
    filled = table.references(2, [f"r{k}" for k in order], order.tolist(), digests[order].tobytes())
    assert len(table._blocks) == 8
    np.testing.assert_array_equal(table.embeddings(filled.slots), made[order])
    np.testing.assert_array_equal(table.embeddings(filled.slots[:3]), made[order[:3]])


def test_referenced_rows_are_placed_in_input_order_from_the_table_by_the_shard_writer():
    from hpcembed.roles.dedup import BLOCK_ROWS, KeptRows
    from hpcembed.roles.encoder import _in_order
    rng = np.random.default_rng(4)
    table = DigestTable(memory_bytes=1 << 32)
    n = BLOCK_ROWS + 500                     # the kept rows span two blocks
    digests = _digests(rng, n)
    table.claim(digests.tobytes())
    made = rng.random((n, 8)).astype(np.float32)
    table.encoded(digests, made)
    # A part as the loop leaves it: an encoded batch's rows (input rows 1, 4, 0), then two rows referenced from
    # the table (input rows 3 and 2: slots in different blocks).
    encoded = rng.random((3, 8)).astype(np.float32)
    slots = np.array([n - 1, 2])
    rows = np.array([1, 4, 0, 3, 2])
    out = _in_order([encoded, KeptRows(table, slots)], np.argsort(rows, kind="stable"))
    expected = np.concatenate([encoded, made[slots]])[np.argsort(rows, kind="stable")]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(_in_order([KeptRows(table, slots)], None), made[slots])


def test_reused_arrays_are_kept_uncopied_and_placed_beside_rows_made_here(monkeypatch):
    """--reuse: arrays whose every row is kept stay as read (no copy), one with a repeat inside is copied without
    it; a gather over loaded slots of several arrays and slots made here, in any order, returns each row's own
    embedding, and the float16 earlier rows come back exact in the float32 result."""
    import hpcembed.roles.dedup as dedup
    monkeypatch.setattr(dedup, "BLOCK_ROWS", 8)
    rng = np.random.default_rng(6)
    table = DigestTable(memory_bytes=1 << 30)
    first, second = _digests(rng, 7), _digests(rng, 5)
    second[3] = second[1]                                  # a repeat within one earlier output
    first_rows = rng.random((7, 4)).astype(np.float16)
    second_rows = rng.random((5, 4)).astype(np.float32)
    assert table.load(first, first_rows) == 7 and table.load(second, second_rows) == 4
    assert np.shares_memory(table._loaded[0], first_rows) and not np.shares_memory(table._loaded[1], second_rows)
    made_digests = _digests(rng, 11)
    assert table.claim(made_digests.tobytes()).all()
    made = rng.random((11, 4)).astype(np.float32)
    table.encoded(made_digests, made)
    everything = np.concatenate([first, np.delete(second, 3, axis=0), made_digests])
    expected = np.concatenate([first_rows.astype(np.float32), np.delete(second_rows, 3, axis=0), made])
    order = rng.permutation(len(everything))
    filled = table.references(3, [f"r{k}" for k in order], order.tolist(), everything[order].tobytes())
    np.testing.assert_array_equal(table.embeddings(filled.slots), expected[order])
    assert table.rows_reused == 11 and table.rows_deduplicated == 11
    with pytest.raises(RuntimeError):
        table.load(_digests(rng, 2), made[:2])
