"""tools/real_webui/random_weights.py: the streamed random-weight writer behind the SDXL checkpoint
and the ViT-bigG encoder used in the real WebUI (docs/REAL_WEBUI.md)."""

import os
import sys

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "real_webui"))
import random_weights as rw  # noqa: E402


class Owner(torch.nn.Module):
    """A module with a parameter of its own (no reset_parameters), a buffer and children."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.empty(3))
        self.register_buffer("ids", torch.arange(5))
        self.register_buffer("scratch", torch.empty(2), persistent=False)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
        self.embed = torch.nn.Embedding(10, 4)


def init(name, m):
    """The caller's rules: Owner's own tensors."""
    if isinstance(m, Owner):
        m.scale.fill_(0.5)
        m.ids.copy_(torch.arange(5))


def meta_owner():
    with torch.device("meta"):
        return Owner()


def read(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("limit", [1, 40, 10_000])  # every module alone / some blocks whole / all at once
def test_written_file_matches_the_model_layout(tmp_path, limit):
    model = meta_owner()
    path = str(tmp_path / "w.safetensors")
    torch.manual_seed(0)
    n = rw.write_random(model, path, init, limit=limit)
    sd = read(path)
    expected = model.state_dict()
    assert n == len(expected) == len(sd) == 9  # scale, ids, 2 x Linear (w, b), LayerNorm (w, b), embedding
    assert "scratch" not in sd  # non-persistent buffers are not part of a checkpoint
    for key, t in expected.items():
        assert tuple(sd[key].shape) == tuple(t.shape), key
        assert sd[key].dtype == (torch.float16 if t.is_floating_point() else t.dtype), key
    assert torch.equal(sd["ids"], torch.arange(5))
    assert torch.all(sd["scale"] == 0.5)
    assert torch.all(sd["body.1.weight"] == 1) and torch.all(sd["body.1.bias"] == 0)  # LayerNorm defaults
    bound = 8 ** -0.5  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w = sd["body.0.weight"].float()
    assert w.abs().max() <= bound + 1e-3 and w.std() > bound / 4
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    assert all(p.is_meta for p in model.parameters())  # every block freed again


def test_same_seed_same_bytes_whatever_the_block_size(tmp_path):
    paths = []
    for limit in (1, 10_000):
        torch.manual_seed(0)
        paths.append(str(tmp_path / f"w{limit}.safetensors"))
        rw.write_random(meta_owner(), paths[-1], init, limit=limit)
    a, b = read(paths[0]), read(paths[1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_tensor_no_init_reaches_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="scale: no init filled this tensor"):
        rw.write_random(meta_owner(), str(path), init=None)
    assert not path.exists()  # no half-written file left behind


def test_skip_and_file_dtype(tmp_path):
    path = str(tmp_path / "w.safetensors")
    rw.write_random(meta_owner(), path, init, skip=("embed.",),
                    file_dtype=lambda key, t: torch.float32 if key == "scale" else rw.fp16_weights(key, t))
    sd = read(path)
    assert "embed.weight" not in sd and sd["scale"].dtype == torch.float32 and sd["body.0.bias"].dtype == torch.float16


def test_stream_refuses_a_tensor_out_of_order(tmp_path):
    writer = rw.StreamedSafetensors(str(tmp_path / "w.safetensors"), [("a", torch.float16, (2,)),
                                                                      ("b", torch.float16, (3,))])
    with pytest.raises(ValueError, match="expected a"):
        writer.put("b", torch.zeros(3, dtype=torch.float16))
    writer.put("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="1 tensors never written, first b"):
        writer.close()


def test_tame_layer_norm_looks_trained():
    norm = torch.nn.LayerNorm(768)
    with torch.no_grad():
        rw.tame_layer_norm(norm, seed=0)
    norm.requires_grad_(False)
    assert abs(float(norm.bias.mean()) - 0.5) < 0.02 and abs(float(norm.weight.mean()) - 1) < 0.02
    assert 0.08 < float(norm.weight.std()) < 0.12
