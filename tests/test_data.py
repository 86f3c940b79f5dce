"""DataLoaderLite: token shards (.npy and llm.c .bin) -> micro-batches, ranks, epochs, shuffle, resume,
bad data.

Every shard is filled with distinct consecutive token ids (a running counter over the whole folder), so a
batch says which shard and offset it came from, and equality checks cannot pass by accident.
"""

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from conftest import write_bin_shard, write_npy_shard
from common import UserError
from train_gpt2 import DataLoaderLite

B, T = 2, 4
BT = B * T


# -----------------------------------------------------------------------------
# Helpers


def make_dir(path, shards, start=0):
    """Write shards {name: n_tokens} into folder `path` (created), in the given order, as .npy or .bin
    by name.

    Tokens are a running counter from `start` across the shards, so every token id in the folder is distinct.
    Returns {name: tokens}.
    """
    os.makedirs(path, exist_ok=True)
    out, next_id = {}, start
    for name, n in shards.items():
        tokens = np.arange(next_id, next_id + n) % 65536
        next_id += n
        write = write_bin_shard if name.endswith(".bin") else write_npy_shard
        write(os.path.join(path, name), tokens)
        out[name] = tokens.astype(np.int64)
    return out


def expected_stream(shards):
    """The spec's micro-batch stream for one epoch of `shards` (token arrays, in reading order): [(x, y)]."""
    out = []
    for tokens in shards:
        for i in range((len(tokens) - 1) // BT):
            buf = tokens[i * BT: (i + 1) * BT + 1]
            out.append((buf[:-1].reshape(B, T), buf[1:].reshape(B, T)))
    return out


def sorted_stream(shards):
    """expected_stream of make_dir's result restricted to `shards`' names, in sorted name order."""
    return expected_stream([shards[n] for n in sorted(shards)])


def read(loader, k):
    """The next k micro-batches of `loader`, as numpy (x, y) pairs; checks each one's shape and dtype."""
    out = []
    for _ in range(k):
        x, y = loader.next_batch()
        assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        assert x.shape == (B, T) and y.shape == (B, T)
        assert x.dtype == torch.long and y.dtype == torch.long
        out.append((x.numpy().copy(), y.numpy().copy()))
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for i, ((gx, gy), (wx, wy)) in enumerate(zip(got, want)):
        assert np.array_equal(gx, wx), f"x of micro-batch {i}: {gx.tolist()} != {wx.tolist()}"
        assert np.array_equal(gy, wy), f"y of micro-batch {i}: {gy.tolist()} != {wy.tolist()}"


def key(batch):
    """A micro-batch (x, y) as something hashable and sortable, to compare batches as multisets."""
    return batch[0].tobytes(), batch[1].tobytes()


def loader(data_dir, split="train", **kwargs):
    return DataLoaderLite(str(data_dir), split, B, T, **kwargs)


def shard_of(shards, batch):
    """The name of the shard (from make_dir's result) that batch (x, y) was cut from, and its micro-batch
    index."""
    first = batch[0][0, 0]
    for name, tokens in shards.items():
        hits = np.flatnonzero(tokens == first)
        if len(hits):
            assert hits[0] % BT == 0, (f"micro-batch starts at offset {hits[0]} of {name}, "
                                       "not a multiple of B*T")
            return name, hits[0] // BT
    raise AssertionError(f"token {first} is in no shard")


def bad_data_error(data_dir, split="train", **kwargs):
    """The UserError that constructing a loader raises; checks it is one line."""
    with pytest.raises(UserError) as info:
        loader(data_dir, split, **kwargs)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg, msg
    return msg


# Written out of name order. Micro-batches: 4 (a tail of 3 tokens dropped), 2 (exactly 2*B*T+1 tokens),
# 5 (a tail of B*T-1 tokens dropped): 11 per epoch, a multiple of neither 2 nor 3 ranks.
THREE_SHARDS = {"edufineweb_train_000002.npy": 6 * BT,
                "edufineweb_train_000000.npy": 4 * BT + 3,
                "edufineweb_train_000001.npy": 2 * BT + 1}


# -----------------------------------------------------------------------------
# Formats, file selection, memory-mapping


def test_reads_micro_batches_in_sorted_shard_order_and_wraps_around(tmp_path):
    shards = make_dir(tmp_path, THREE_SHARDS)  # written out of name order
    want = sorted_stream(shards)
    assert len(want) == 4 + 2 + 5
    dl = loader(tmp_path)
    got = read(dl, 2 * len(want) + 3)
    assert_same(got, want + want + want[:3])  # epoch 2 starts again with shard 0's first micro-batch
    # Spelled out for the first micro-batch: x = tokens[0:8] as (2, 4), y = tokens[1:9].
    t0 = shards["edufineweb_train_000000.npy"]
    assert got[0][0].tolist() == [t0[0:4].tolist(), t0[4:8].tolist()]
    assert got[0][1].tolist() == [t0[1:5].tolist(), t0[5:9].tolist()]


def test_micro_batch_boundaries_within_a_shard(tmp_path):
    # Exactly k*B*T+1 tokens give k micro-batches; one fewer gives k-1 (the tail is dropped).
    shards = make_dir(tmp_path, {"a_train_0.npy": 2 * BT + 1, "a_train_1.npy": 2 * BT,
                                 "a_train_2.npy": BT + 1})
    dl = loader(tmp_path)
    got = read(dl, 4)
    names = [shard_of(shards, b) for b in got]
    assert names == [("a_train_0.npy", 0), ("a_train_0.npy", 1), ("a_train_1.npy", 0), ("a_train_2.npy", 0)]
    assert_same(read(dl, 4), got)  # 4 micro-batches per epoch, then it wraps


def test_npy_and_bin_give_identical_batches(tmp_path):
    names = sorted(THREE_SHARDS)
    npy = make_dir(tmp_path / "npy", {n: THREE_SHARDS[n] for n in names})
    binary = make_dir(tmp_path / "bin", {n.replace(".npy", ".bin"): THREE_SHARDS[n] for n in names})
    assert [list(t) for t in npy.values()] == [list(t) for t in binary.values()]
    a, b = read(loader(tmp_path / "npy"), 12), read(loader(tmp_path / "bin"), 12)
    assert_same(a, b)
    assert_same(a, (sorted_stream(npy) * 2)[:12])


def test_npy_and_bin_shards_mix_in_one_split(tmp_path):
    shards = make_dir(tmp_path, {"s_train_1.bin": 2 * BT + 1, "s_train_0.npy": BT + 1,
                                 "s_train_2.npy": BT + 1})
    assert_same(read(loader(tmp_path), 8), sorted_stream(shards) * 2)


@pytest.mark.parametrize("ext", ["npy", "bin"])
def test_shards_are_memory_mapped(tmp_path, ext):
    make_dir(tmp_path, {f"x_train_0.{ext}": 3 * BT + 1, f"x_train_1.{ext}": 2 * BT + 1})
    dl = loader(tmp_path)
    assert len(dl.shards) == 2
    for shard in dl.shards:
        assert isinstance(shard, np.memmap), type(shard)
        assert shard.dtype == np.uint16 and shard.ndim == 1
    assert len(dl.shards[0]) == 3 * BT + 1 and len(dl.shards[1]) == 2 * BT + 1
    read(dl, 6)  # reading batches does not replace them with loaded copies
    assert all(isinstance(shard, np.memmap) for shard in dl.shards)


def test_splits_and_unrelated_files_are_kept_apart(tmp_path):
    train = make_dir(tmp_path, {"edufineweb_train_000001.npy": 2 * BT + 1,
                                "edufineweb_train_000002.bin": BT + 1})
    val = make_dir(tmp_path, {"edufineweb_val_000000.npy": 3 * BT + 1}, start=10000)
    # Files the loader must ignore; reading any of them as a shard would fail or change the batches.
    (tmp_path / "manifest.json").write_text('{"train": 2, "val": 1}')
    (tmp_path / "notes.txt").write_text("train val")
    (tmp_path / "train_notes.txt").write_text("not a shard")
    (tmp_path / "val_tokens.csv").write_text("1,2,3")
    np.save(tmp_path / "other_000000.npy", np.arange(100, dtype=np.int32))  # neither split in its name
    write_bin_shard(tmp_path / "tokens_000003.bin", np.arange(20000, 20000 + BT + 1))
    (tmp_path / "train_subdir_is_not_a_file.txt").mkdir()

    dl = loader(tmp_path, "train")
    assert [os.path.basename(p) for p in dl.paths] == ["edufineweb_train_000001.npy",
                                                       "edufineweb_train_000002.bin"]
    assert_same(read(dl, 6), sorted_stream(train) * 2)
    dl = loader(tmp_path, "val")
    assert [os.path.basename(p) for p in dl.paths] == ["edufineweb_val_000000.npy"]
    assert_same(read(dl, 6), sorted_stream(val) * 2)


def test_shard_too_short_for_one_micro_batch_is_skipped(tmp_path):
    # Empty shards (0 tokens) counted -1 micro-batches: the next shard's micro-batch 0 was never read.
    shards = make_dir(tmp_path, {"d_train_0.npy": 2 * BT + 1, "d_train_1.npy": BT, "d_train_2.npy": 1,
                                 "d_train_3.bin": BT, "d_train_35.npy": 0, "d_train_36.bin": 0,
                                 "d_train_4.npy": BT + 1})
    dl = loader(tmp_path)
    got = read(dl, 6)
    assert [shard_of(shards, b)[0] for b in got] == ["d_train_0.npy", "d_train_0.npy", "d_train_4.npy"] * 2
    assert_same(got, sorted_stream(shards) * 2)


# -----------------------------------------------------------------------------
# Ranks and gradient accumulation


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_interleave_into_the_single_process_stream(tmp_path, world):
    shards = make_dir(tmp_path, THREE_SHARDS)
    per_epoch = len(sorted_stream(shards))
    n = 3 * per_epoch + 1  # several epochs: crosses every shard boundary and wraps around more than once
    single = read(loader(tmp_path), n * world)
    assert_same(single, (sorted_stream(shards) * (world * n // per_epoch + 1))[:n * world])
    ranks = [read(loader(tmp_path, process_rank=r, num_processes=world), n) for r in range(world)]
    # Rank r's k-th micro-batch is the single process's micro-batch k*W + r.
    interleaved = [ranks[r][k] for k in range(n) for r in range(world)]
    assert_same(interleaved, single)


@pytest.mark.parametrize("world,accum", [(2, 2), (3, 2), (2, 3)])
def test_ranks_with_accumulation_see_the_tokens_of_one_process_with_world_times_accumulation(tmp_path, world,
                                                                                             accum):
    make_dir(tmp_path, THREE_SHARDS)
    steps = 7  # 7 * W * A micro-batches: several epochs
    single = loader(tmp_path)
    ranks = [loader(tmp_path, process_rank=r, num_processes=world) for r in range(world)]
    for step in range(steps):
        one = read(single, world * accum)
        many = [b for dl in ranks for b in read(dl, accum)]
        assert sorted(map(key, many)) == sorted(map(key, one)), f"step {step}: the ranks saw other tokens"


# -----------------------------------------------------------------------------
# position and reset()


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1), (3, 2)])
def test_position_is_the_whole_state(tmp_path, world, rank):
    make_dir(tmp_path, THREE_SHARDS)
    # 11 micro-batches per epoch: inside shards, at boundaries, past wrap-arounds
    for k in (0, 1, 4, 6, 10, 11, 13, 25):
        original = loader(tmp_path, process_rank=rank, num_processes=world)
        read(original, k)
        saved = original.position
        restored = loader(tmp_path, process_rank=rank, num_processes=world)
        restored.position = saved
        assert_same(read(restored, 12), read(original, 12))


def test_position_is_where_the_first_micro_batch_no_rank_has_read_begins(tmp_path):
    make_dir(tmp_path, THREE_SHARDS)  # in sorted order: 4, 2 and 5 micro-batches
    ranks = [loader(tmp_path, process_rank=r, num_processes=3) for r in range(3)]
    for rounds, position in ((0, (0, 0, 0)), (1, (0, 0, 3 * BT)), (1, (0, 2, 0)), (3, (1, 1, 0))):
        for dl in ranks:
            read(dl, rounds)
        assert [dl.position for dl in ranks] == [position] * 3  # (epoch, shard, tokens into it)


def stream_from(tokens, shard, offset, bt, n):
    """The first n x's (bt tokens each) of the unshuffled stream of `tokens` (arrays, in reading order)
    that begins `offset` tokens into tokens[shard]: a shard goes on while it holds bt + 1 more tokens."""
    out = []
    while len(out) < n:
        while offset + bt + 1 <= len(tokens[shard]) and len(out) < n:
            out.append(tokens[shard][offset: offset + bt])
            offset += bt
        shard, offset = (shard + 1) % len(tokens), 0
    return out


@pytest.mark.parametrize("b,t,world", [(1, 4, 1), (4, 4, 1), (1, 3, 2), (2, 4, 3), (3, 5, 2)])
def test_a_loader_of_another_size_or_rank_count_continues_at_the_first_unread_token(tmp_path, b, t, world):
    """Resume with another --micro_batch_size, --seq_len or GPU count: the position carries over as a token,
    so nothing is read twice or skipped (a shard too short for another micro-batch of the new size ends)."""
    shards = make_dir(tmp_path, THREE_SHARDS)
    tokens = [shards[n] for n in sorted(shards)]
    starts = [(s, i * BT) for s, ts in enumerate(tokens) for i in range((len(ts) - 1) // BT)]
    for k in (0, 3, 4, 5, 6, 10, 14):  # inside and at the end of shards, at and past the wrap-around
        first = loader(tmp_path)
        read(first, k)
        rest = [DataLoaderLite(str(tmp_path), "train", b, t, r, world) for r in range(world)]
        for dl in rest:
            dl.position = first.position
        got = [dl.next_batch()[0].flatten().numpy() for _ in range(8) for dl in rest]
        want = stream_from(tokens, *starts[k % len(starts)], b * t, 8 * world)
        assert [g.tolist() for g in got] == [w.tolist() for w in want], f"after {k} micro-batches"


# -----------------------------------------------------------------------------
# Shuffle


EIGHT_SHARDS = {f"edufineweb_train_{i:06d}.npy": (1 + i % 3) * BT + 1 + i for i in range(8)}  # 1, 2 or 3 each
# Shards of 9, 6, 9 and 12 micro-batches (33 per epoch): room for in-shard orders to differ, and two shards
# of equal size, whose orders must differ too.
LONG_SHARDS = {f"edufineweb_train_{i:06d}.npy": n * BT + 1 + i for i, n in enumerate((9, 6, 9, 12))}


def batch_counts(shards):
    return {n: (len(tokens) - 1) // BT for n, tokens in shards.items()}


def epochs_of(shards, batches_per_epoch, got):
    """Split a stream into epochs; for each, the shard order and [(shard, micro-batch index)]."""
    out = []
    for e in range(len(got) // batches_per_epoch):
        visits = [shard_of(shards, b) for b in got[e * batches_per_epoch:(e + 1) * batches_per_epoch]]
        order = []
        for name, _ in visits:
            if not order or order[-1] != name:
                order.append(name)
        out.append((order, visits))
    return out


@pytest.mark.parametrize("layout", [EIGHT_SHARDS, LONG_SHARDS])
def test_shuffle_visits_every_micro_batch_once_per_epoch_shard_by_shard(tmp_path, layout):
    shards = make_dir(tmp_path, layout)
    counts = batch_counts(shards)
    unshuffled_epoch = sorted_stream(shards)
    per_epoch = len(unshuffled_epoch)
    dl = loader(tmp_path, shuffle=True, seed=1337)
    assert dl.batches_per_epoch == per_epoch
    got = read(dl, 4 * per_epoch)
    want_visits = sorted((n, i) for n in shards for i in range(counts[n]))
    for e, (order, visits) in enumerate(epochs_of(shards, per_epoch, got)):
        assert sorted(order) == sorted(shards), f"shard order {order} is not a permutation (each shard once)"
        assert sorted(visits) == want_visits  # every micro-batch exactly once
        epoch = got[e * per_epoch:(e + 1) * per_epoch]
        # the same (x, y) pairs, reordered
        assert sorted(map(key, epoch)) == sorted(map(key, unshuffled_epoch))
    # The batches themselves are the shards' micro-batches, x and y as in the unshuffled stream.
    unshuffled = {shard_of(shards, b): b for b in unshuffled_epoch}
    assert_same(got, [unshuffled[shard_of(shards, b)] for b in got])


def test_shuffle_draws_a_new_shard_order_every_epoch(tmp_path):
    shards = make_dir(tmp_path, EIGHT_SHARDS)
    per_epoch = len(sorted_stream(shards))
    orders = [order for order, _ in epochs_of(shards, per_epoch,
                                              read(loader(tmp_path, shuffle=True), 4 * per_epoch))]
    assert any(order != sorted(shards) for order in orders), "shuffle=True never shuffled the shards"
    for e in range(1, len(orders)):
        assert orders[e] != orders[e - 1], f"epochs {e - 1} and {e} have the same shard order"


def test_shuffle_permutes_the_micro_batches_within_each_shard_every_epoch(tmp_path):
    shards = make_dir(tmp_path, LONG_SHARDS)
    counts = batch_counts(shards)
    per_epoch = sum(counts.values())
    epochs = epochs_of(shards, per_epoch, read(loader(tmp_path, shuffle=True, seed=1337), 3 * per_epoch))
    # per epoch, per shard
    within = [{n: [i for m, i in visits if m == n] for n in shards} for _, visits in epochs]
    for e, orders in enumerate(within):
        for n, order in orders.items():
            assert order != list(range(counts[n])), (f"epoch {e}: {n}'s micro-batches in their "
                                                     "unshuffled order")
            if e:
                assert order != within[e - 1][n], (f"epochs {e - 1} and {e} read {n}'s micro-batches "
                                                   "in one order")
        a, b = (orders[n] for n in sorted(shards) if counts[n] == 9)
        assert a != b, f"epoch {e}: the two 9-micro-batch shards share one order"


@pytest.mark.parametrize("layout", [EIGHT_SHARDS, {"edufineweb_train_000000.npy": 20 * BT + 1}])
def test_shuffle_is_deterministic_from_the_seed(tmp_path, layout):
    # With one shard, only the order within it can tell two seeds apart.
    shards = make_dir(tmp_path, layout)
    n = 3 * len(sorted_stream(shards))
    a = read(loader(tmp_path, shuffle=True, seed=7), n)
    assert_same(read(loader(tmp_path, shuffle=True, seed=7), n), a)
    other = read(loader(tmp_path, shuffle=True, seed=8), n)
    assert any(not np.array_equal(x, ox)
               for (x, _), (ox, _) in zip(a, other)), "seeds 7 and 8 gave the same order"


def test_shuffle_draws_each_shards_order_once_per_epoch(tmp_path, monkeypatch):
    # Not once per micro-batch: a FineWeb shard holds ~1500 micro-batches of 64 x 1024.
    shards = make_dir(tmp_path, LONG_SHARDS)
    per_epoch = len(sorted_stream(shards))
    dl = loader(tmp_path, shuffle=True)
    draws, default_rng = [], np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed: draws.append(seed) or default_rng(seed))
    read(dl, 2 * per_epoch)
    # Per epoch: the shard order, then each shard's order; and the next epoch's shard order (the position's)
    assert len(draws) == 2 * (1 + len(shards)) + 1 and draws[-1] == [1337, 2]


def test_shuffle_is_off_by_default_so_val_keeps_sorted_order_every_epoch(tmp_path):
    # The trainer builds the val loader with the default shuffle=False: its order never changes.
    shards = make_dir(tmp_path, {k.replace("train", "val"): v for k, v in LONG_SHARDS.items()})
    want = sorted_stream(shards)
    assert_same(read(loader(tmp_path, "val"), 3 * len(want)), want * 3)
    assert_same(read(loader(tmp_path, "val", seed=99), 3 * len(want)), want * 3)
    assert_same(read(loader(tmp_path, "val", shuffle=False), 3 * len(want)), want * 3)


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1), (3, 2)])
def test_shuffled_position_restored_anywhere_continues_identically(tmp_path, world, rank):
    shards = make_dir(tmp_path, LONG_SHARDS)
    per_epoch = len(sorted_stream(shards))
    for k in (0, 5, per_epoch // world + 3, (per_epoch + per_epoch // 2) // world, 3 * per_epoch // world):
        original = loader(tmp_path, shuffle=True, seed=3, process_rank=rank, num_processes=world)
        read(original, k)  # mid shard, mid epoch 2, past epochs
        restored = loader(tmp_path, shuffle=True, seed=3, process_rank=rank, num_processes=world)
        # elsewhere first: what it cached must not leak into the restored stream
        read(restored, 2 * per_epoch)
        restored.position = original.position
        assert_same(read(restored, 2 * per_epoch), read(original, 2 * per_epoch))


@pytest.mark.parametrize("world", [2, 3])
def test_shuffled_ranks_interleave_into_the_single_process_stream(tmp_path, world):
    shards = make_dir(tmp_path, LONG_SHARDS)
    n = 2 * len(sorted_stream(shards)) + 1
    single = read(loader(tmp_path, shuffle=True, seed=5), world * n)
    ranks = [read(loader(tmp_path, shuffle=True, seed=5, process_rank=r, num_processes=world), n)
             for r in range(world)]
    assert_same([ranks[r][k] for k in range(n) for r in range(world)], single)


# -----------------------------------------------------------------------------
# Bad data: a one-line UserError naming the file or folder


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_folder"
    msg = bad_data_error(missing)
    assert str(missing) in msg


def test_no_shards_for_the_split(tmp_path):
    make_dir(tmp_path, {"edufineweb_val_000000.npy": 3 * BT + 1})
    (tmp_path / "manifest.json").write_text("{}")
    msg = bad_data_error(tmp_path, "train")
    assert str(tmp_path) in msg
    assert "edufineweb_train_000001.npy" in msg
    assert "python fineweb.py" in msg


def test_empty_data_dir(tmp_path):
    msg = bad_data_error(tmp_path, "val")
    assert str(tmp_path) in msg and "edufineweb_val_000001.npy" in msg and "python fineweb.py" in msg


def test_no_shard_holds_one_micro_batch(tmp_path):
    make_dir(tmp_path, {"edufineweb_train_000000.npy": BT, "edufineweb_train_000001.bin": BT,
                        "edufineweb_train_000002.npy": 3, "edufineweb_train_000003.npy": 0,
                        "edufineweb_train_000004.bin": 0})  # empty ones were a traceback
    msg = bad_data_error(tmp_path)
    assert str(tmp_path) in msg
    assert "--micro_batch_size" in msg and "--seq_len" in msg


def write_bad(path, kind):
    """One kind of broken shard at `path`."""
    good = np.arange(3 * BT + 1)
    if kind == "npy_int32":
        np.save(path, good.astype(np.int32))
    elif kind == "npy_2d":
        np.save(path, good[:3 * BT].astype(np.uint16).reshape(3, BT))
    elif kind == "npy_text":
        path.write_text("these are not tokens\n" * 10)
    elif kind == "npy_empty":
        path.write_bytes(b"")
    elif kind == "npy_truncated":
        np.save(path, good.astype(np.uint16))
        path.write_bytes(path.read_bytes()[:-6])
    elif kind == "npy_header_only":
        np.save(path, good.astype(np.uint16))
        path.write_bytes(path.read_bytes()[:40])
    elif kind == "npy_is_npz":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("tokens.npy", b"not really")
    elif kind == "bin_magic":
        write_bin_shard(path, good)
        data = bytearray(path.read_bytes())
        data[:4] = np.int32(20240521).tobytes()
        path.write_bytes(bytes(data))
    elif kind == "bin_version_2":
        write_bin_shard(path, good)
        data = bytearray(path.read_bytes())
        data[4:8] = np.int32(2).tobytes()
        path.write_bytes(bytes(data))
    elif kind == "bin_truncated":
        write_bin_shard(path, good)
        path.write_bytes(path.read_bytes()[:-2])
    elif kind == "bin_too_long":
        write_bin_shard(path, good)
        path.write_bytes(path.read_bytes() + b"\0\0")
    elif kind == "bin_header_short":
        path.write_bytes(np.array([20240520, 1, 9], dtype=np.int32).tobytes())
    elif kind == "bin_npy_inside":
        np.save(path.with_suffix(".tmp.npy"), good.astype(np.uint16))
        path.write_bytes(path.with_suffix(".tmp.npy").read_bytes())
        os.remove(path.with_suffix(".tmp.npy"))
    else:
        raise AssertionError(kind)


BAD_KINDS = {  # kind: words the message must hold besides the file name
    "npy_int32": ["int32", "uint16"],
    "npy_2d": ["2-D", "uint16"],
    "npy_text": [],
    "npy_empty": [],
    "npy_truncated": [],
    "npy_header_only": [],
    "npy_is_npz": [],
    "bin_magic": ["20240520"],
    "bin_version_2": ["version 2"],
    "bin_truncated": ["truncated"],
    "bin_too_long": [],
    "bin_header_short": [],
    "bin_npy_inside": ["20240520"],
}


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_shard_is_a_one_line_error_naming_the_file(tmp_path, kind):
    ext = kind.split("_")[0]
    make_dir(tmp_path, {"edufineweb_train_000000.npy": 3 * BT + 1})  # a good shard before it does not help
    bad = tmp_path / f"edufineweb_train_000001.{ext}"
    write_bad(bad, kind)
    msg = bad_data_error(tmp_path)
    assert str(bad) in msg
    for words in BAD_KINDS[kind]:
        assert words in msg, f"{words!r} not in {msg!r}"


def test_bad_val_shard_is_found_when_the_val_loader_is_built(tmp_path):
    make_dir(tmp_path, {"edufineweb_train_000000.npy": 3 * BT + 1})
    bad = tmp_path / "edufineweb_val_000000.npy"
    write_bad(bad, "npy_int32")
    loader(tmp_path, "train")  # the train split does not read it
    msg = bad_data_error(tmp_path, "val")
    assert str(bad) in msg


def test_token_id_out_of_vocab_is_raised_when_that_shard_is_first_read(tmp_path):
    shards = make_dir(tmp_path, {"v_train_0.npy": 2 * BT + 1, "v_train_1.bin": 2 * BT + 1,
                                 "v_train_2.npy": BT + 1})
    top_ok = int(shards["v_train_1.bin"].max())
    # shards 0 and 1 fit exactly (max id == vocab_size - 1); shard 2 holds ids >= vocab_size
    vocab = top_ok + 1
    dl = loader(tmp_path, vocab_size=vocab)  # building the loader reads no tokens
    got = read(dl, 4)  # shards 0 and 1 are fine
    assert_same(got, sorted_stream(shards)[:4])
    with pytest.raises(UserError) as info:
        dl.next_batch()
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg
    assert str(tmp_path / "v_train_2.npy") in msg
    assert str(vocab) in msg


def test_token_id_equal_to_vocab_size_late_in_a_shard_is_caught_on_its_first_batch(tmp_path):
    # The offending id (== vocab_size, the smallest bad one) sits in the shard's last micro-batch: the check
    # covers the whole shard, not just the slice the first batch reads.
    tokens = np.arange(3 * BT + 1) % 50
    tokens[-2] = 50
    write_npy_shard(tmp_path / "w_train_0.npy", tokens)
    dl = loader(tmp_path, vocab_size=50)
    with pytest.raises(UserError) as info:
        dl.next_batch()
    assert str(tmp_path / "w_train_0.npy") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("vocab_size, top, ok", [(50304, 50256, True), (50304, 50257, False),
                                                 (50304, 50303, False), (50257, 50260, False),
                                                 (60000, 50303, True), (50000, 50000, False)])
def test_with_gpt2s_vocabulary_the_padding_ids_are_refused(tmp_path, vocab_size, top, ok):
    """--vocab_size 50304 is GPT-2's 50257 ids padded to a multiple of 128: ids 50257..50303 are no GPT-2
    token. Another --vocab_size (another tokenizer) keeps its own limit."""
    write_npy_shard(tmp_path / "g_train_0.npy", np.full(2 * BT + 1, top))
    dl = loader(tmp_path, vocab_size=vocab_size)
    if ok:
        assert (read(dl, 1)[0][0] == top).all()
        return
    with pytest.raises(UserError) as info:
        dl.next_batch()
    limit = "GPT-2's 50257 ids" if vocab_size in (50257, 50304) else f"the model's vocab_size {vocab_size}"
    assert str(info.value) == (f"{tmp_path / 'g_train_0.npy'}: token id {top} is past {limit}; "
                               f"the shard was made with another tokenizer")


def test_token_ids_below_vocab_are_accepted_on_every_read(tmp_path):
    write_npy_shard(tmp_path / "u_train_0.npy", np.full(2 * BT + 1, 49))
    dl = loader(tmp_path, vocab_size=50)
    for x, y in read(dl, 5):
        assert (x == 49).all() and (y == 49).all()


def test_split_is_the_word_right_before_the_shard_number(tmp_path):
    """A prefix such as "eval" holds the letters of "val": its train shards are still train shards. llm.c's
    names have no number at times (tiny_shakespeare_val.bin); a split word elsewhere in a name is no split."""
    make_dir(tmp_path, {"eval_val_000000.npy": 9, "eval_train_000001.npy": 17, "tiny_shakespeare_val.bin": 9,
                        "tiny_shakespeare_train.bin": 17, "x-train.000002.npy": 17,
                        "train_notes_000003.npy": 17, "val_tokens.npy": 9})
    train = DataLoaderLite(str(tmp_path), "train", 2, 4)
    val = DataLoaderLite(str(tmp_path), "val", 2, 4)
    assert [os.path.basename(p) for p in train.paths] == ["eval_train_000001.npy",
                                                          "tiny_shakespeare_train.bin", "x-train.000002.npy"]
    assert [os.path.basename(p) for p in val.paths] == ["eval_val_000000.npy", "tiny_shakespeare_val.bin"]


@pytest.mark.parametrize("name", ["train_val_000000.npy", "my_val_train_000001.npy", "val-x-train.bin"])
def test_a_shard_name_holding_both_split_words_is_an_error(tmp_path, name):
    """fineweb.py --prefix train wrote train_val_000000.npy, which was read as a train shard too."""
    make_dir(tmp_path, {"d_train_000001.npy": 3 * BT + 1, "d_val_000000.npy": 3 * BT + 1, name: 3 * BT + 1})
    for split in ("train", "val"):
        assert bad_data_error(tmp_path, split) == f"{tmp_path / name}: its name holds both train and val, " \
            f"so its split is unclear; rename it, or remake the folder with a fineweb.py --prefix holding " \
            f"neither"


def write_manifest(path, shards, damage):
    """fineweb.py's manifest.json for make_dir's `shards`, damaged: a shard it lists missing from the
    folder, one it does not list added, or one of another size than listed."""
    entries = [{"name": n, "split": n.split("_")[1], "tokens": len(t), "bytes": os.path.getsize(path / n)}
               for n, t in shards.items()]
    (path / "manifest.json").write_text(json.dumps({"shards": entries, "done": True}))
    if damage == "missing":
        os.remove(path / "m_train_000002.npy")
    elif damage == "extra":
        write_npy_shard(path / "m_train_000003.npy", np.arange(3 * BT + 1))
    elif damage == "resized":
        write_npy_shard(path / "m_train_000002.npy", np.arange(2 * BT + 1))


@pytest.mark.parametrize("damage, what", [
    (None, None), ("missing", "m_train_000002.npy, listed in its manifest.json, is missing"),
    ("extra", "m_train_000003.npy is not a shard its manifest.json lists (fineweb.py did not write it "
              "there); move it out"),
    ("resized", "m_train_000002.npy, listed in its manifest.json, has 162 bytes, not 178")])
def test_shards_must_be_exactly_those_the_manifest_lists(tmp_path, damage, what):
    shards = make_dir(tmp_path, {"m_val_000000.npy": 3 * BT + 1, "m_train_000001.npy": 3 * BT + 1,
                                 "m_train_000002.npy": 3 * BT + 1})
    write_manifest(tmp_path, shards, damage)
    if damage is None:
        assert len(loader(tmp_path).paths) == 2
        return
    for split in ("train", "val"):  # either loader finds it
        assert bad_data_error(tmp_path, split).startswith(f"--data_dir {tmp_path}: {what}")
