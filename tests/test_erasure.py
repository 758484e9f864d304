"""The fine-tuning erasers of Fig 5.4b (ESD-x, Concept-Ablation) on a random SD-v1-structured pipe."""
import pytest
import torch

from interplab import erasure
from interplab.errors import BadParameter
from interplab.models import tiny_random

FAST = dict(steps=2, batch_size=2, n_images=2)


@pytest.fixture(scope="module")
def pipe():
    return tiny_random.stable_diffusion()


@pytest.mark.parametrize("method", ["esd_x", "concept_ablation"])
def test_erase_trains_only_cross_attention_kv_and_leaves_the_pipe(pipe, method):
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    er = erasure.erase(pipe, method, "van gogh", anchor="painting", **FAST)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())       # the pipe is untouched
    assert set(er.weights) == set(erasure.kv_paths(pipe.unet))
    assert any(not torch.equal(w, before[f"{p}.weight"]) for p, w in er.weights.items())
    saved = er.apply(pipe.unet)
    erasure.Erasure.revert(pipe.unet, saved)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())


def test_fp16_unet_trains_in_float32_and_stays_finite(pipe):
    """Adam on fp16 weights underflows (eps = 1e-8 is 0 in fp16); the copy trains in float32."""
    half = tiny_random.stable_diffusion()
    half.unet.half(), half.vae.half()  # as from_pretrained loads them (the text tower too, on a GPU)
    before = {p: half.unet.get_submodule(p).weight.detach().float().clone() for p in erasure.kv_paths(half.unet)}
    er = erasure.erase(half, "esd_x", "van gogh", lr=1e-3, **FAST)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in er.weights.values())
    assert all(torch.isfinite(torch.tensor(er.losses)))
    assert any(not torch.equal(w, before[p]) for p, w in er.weights.items())       # it trained
    assert next(half.unet.parameters()).dtype == torch.float16
    er.apply(half.unet)
    assert all(torch.isfinite(p).all() for p in half.unet.parameters())


def test_release_settings_and_anchor_check(pipe):
    assert erasure.RELEASE["esd_x"] == dict(steps=1000, lr=1e-5, batch_size=1)
    assert erasure.RELEASE["concept_ablation"]["n_images"] == 200
    with pytest.raises(BadParameter, match="anchor"):
        erasure.erase(pipe, "concept_ablation", "van gogh", **FAST)
