"""kernels._packing: a padded batch packed on the device, its valid tokens one sequence per row, padding apart."""
import pytest
import torch

from kernels._packing import pack_padding, sequence_ids


@pytest.mark.parametrize("singleton_padding", [False, True])
def test_pack_padding_sequences_and_round_trip(singleton_padding):
    torch.manual_seed(3)
    b, t = 4, 9
    valid = torch.rand(b, t) < 0.6
    valid[1] = True  # a full row
    valid[2] = False  # an empty row
    packing = pack_padding(valid, singleton_padding=singleton_padding)
    offsets = packing.cu_seqlens.long()
    assert offsets.dtype == torch.int64 and offsets[0] == 0 and offsets[-1] == b * t
    assert (offsets[1:] >= offsets[:-1]).all()
    assert len(offsets) == (b * (t + 1) + 1 if singleton_padding else 2 * b + 1)  # static: no size from lengths
    sequence = sequence_ids(packing.cu_seqlens, b * t)
    packed_valid = valid.flatten()[packing.order]
    for row in range(b):
        rows = slice(row * t, (row + 1) * t)
        n = int(valid[row].sum())
        assert packed_valid[rows][:n].all() and not packed_valid[rows][n:].any()  # valid first, then padding
        kept = sequence[rows][:n]
        assert (kept == kept[0]).all() if n else True  # the valid tokens: one sequence
        padded = sequence[rows][n:]
        assert not set(padded.tolist()) & set(kept.tolist())  # padding never shares a sequence with valid tokens
        if singleton_padding:
            assert len(set(padded.tolist())) == len(padded)  # each padded token alone
    x = torch.randn(b, t, 5)
    back = packing.unpack(packing.pack(x))
    torch.testing.assert_close(back, x.masked_fill(~valid[..., None], 0), rtol=0, atol=0)
