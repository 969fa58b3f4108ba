"""Regions whose generation phrase is not in the prompt, through the script in the WebUI test double
on the real tiny ldm model: located from the phrase itself (the host's own text encoder), said in
the infotext and under Show masks; prompts that hold every phrase run exactly as before."""

import contextlib

import pytest
import torch

from charadapter import fusion as ca_fusion
from charadapter.webui import caches as ca_caches
from charadapter.webui import controller as ca_controller
from charadapter.webui import prompts as ca_prompts
from charadapter.webui import show_masks as ca_show_masks
from tiny_sd import TINY_CONTEXT_DIM
from webui_host import errors, generate, ours, pixels, plain, shared

KEY = "Character-Adapter located"
NAMED = "a face, upper body, lower body, standing"
UNNAMED = "a knight riding a horse at dusk"
ALL_FROM_PHRASE = "face: from the phrase, upper body: from the phrase, lower body: from the phrase"
ALL_IN_PROMPT = "face: in the prompt, upper body: in the prompt, lower body: in the prompt"


def no_errors():
    return not [m for _, m in errors.reported if "Character-Adapter" in m or "charadapter" in m]


@contextlib.contextmanager
def layouts(monkeypatch):
    """The layout of every FusionSession at its removal (the end of the run), and its bank."""
    seen = []
    original = ca_fusion.FusionSession.remove

    def remove(self):
        seen.append((self.masks, self.state.bank))
        original(self)

    monkeypatch.setattr(ca_fusion.FusionSession, "remove", remove)
    yield seen


def every_region_placed(masks):
    """Each region's normalised map reaches 1 somewhere (its soft mask there >= 1/3 at tau 0.1) and 0
    elsewhere (mask ~0): a layout from maps spans more than 0.3 in every region; the even split that
    groups without tokens left (1/3 everywhere) spans 0, a missing phrase's region ~0.02."""
    regions = masks[:, 1:]  # (I, R, N)
    return bool(((regions.amax(dim=2) - regions.amin(dim=2)) > 0.3).all())


def comments_about_location(p):
    return [c for c in p.comments if "not in the prompt" in c or "could not be located" in c]


def test_a_prompt_naming_no_region_locates_every_region_from_its_phrase(host, sd_model, monkeypatch):
    runner, script = host
    legends = []
    original = ca_show_masks.with_legend
    monkeypatch.setattr(ca_show_masks, "with_legend", lambda image, lines: legends.append(list(lines)) or original(image, lines))
    before = plain(runner, script, prompt=UNNAMED)
    with layouts(monkeypatch) as seen:
        p, processed = generate(script, runner, prompt=UNNAMED, steps=3, params=dict(show_masks=True))
    assert no_errors() and not comments_about_location(p)
    assert p.extra_generation_params[KEY] == ALL_FROM_PHRASE
    assert f'{KEY}: "{ALL_FROM_PHRASE}"' in processed.infotexts[0]
    (masks, bank), = seen
    assert masks.shape == (1, 4, 8 * 8) and torch.allclose(masks.sum(dim=1), torch.ones(1, 64), atol=1e-5)
    assert every_region_placed(masks)  # before issue 14: no maps, an even 1/3 split everywhere
    face, upper, lower = (ca_prompts.phrase_token_count(sd_model, t) for t in ("face", "upper body", "lower body"))
    assert bank.shape == (face + upper + lower, TINY_CONTEXT_DIM)
    assert legends == [["face: from the phrase", "upper body: from the phrase", "lower body: from the phrase"]]
    assert len(processed.images) == 3 and processed.images[2].height > processed.images[0].height  # legend strip
    assert (pixels(processed) - pixels(before)).abs().max() > 0
    assert ours(sd_model.model.diffusion_model) == 0


def test_the_phrase_rows_are_the_host_encoding_of_the_phrase_alone(host, sd_model):
    """Token rows after BOS and before EOS of get_learned_conditioning([phrase]), cached per checkpoint."""
    key = ("hash", 1, 1, "Original", ())
    bank, entries = ca_prompts.phrase_bank(sd_model, ("face", "upper body", "face"), key)
    with torch.no_grad():
        upper = sd_model.get_learned_conditioning(["upper body"])[0]  # (77, C)
    count = ca_prompts.phrase_token_count(sd_model, "upper body")
    assert count == len(sd_model.cond_stage_model.tokenize(["upper body"])[0]) == 2
    start, stop = bank.spans[1]
    assert torch.equal(bank.embeddings[start:stop], upper[1:1 + count].float())
    assert entries[0] == entries[2] == bank.entries(0) and len(bank.spans) == 2  # a repeated phrase once
    misses = ca_caches.PHRASE_CACHE.misses
    ca_prompts.phrase_bank(sd_model, ("face", "upper body"), key)
    assert ca_caches.PHRASE_CACHE.misses == misses
    ca_prompts.phrase_bank(sd_model, ("face",), key[:2] + (2,) + key[3:])  # another CLIP skip: encoded again
    assert ca_caches.PHRASE_CACHE.misses == misses + 1


def test_every_phrase_in_the_prompt_runs_as_before_bit_for_bit(host, sd_model, monkeypatch):
    """No phrase is encoded, no bank is made, and the image is the one the in-prompt groups alone give."""
    runner, script = host
    p, processed = generate(script, runner, prompt=NAMED)
    assert p.extra_generation_params[KEY] == ALL_IN_PROMPT and no_errors()
    with monkeypatch.context() as patch:  # the pre-issue-14 path: groups from the prompt only, no bank
        patch.setattr(ca_prompts.PhraseFinder, "groups", ca_prompts.PhraseFinder.positions)
        patch.setattr(ca_controller.Controller, "_locate", staticmethod(lambda p, gen: None))
        patch.setattr(ca_controller, "phrase_bank", lambda *a: pytest.fail("no phrase is encoded"))
        _, old = generate(script, runner, prompt=NAMED)
    assert torch.equal(pixels(processed), pixels(old))
    with monkeypatch.context() as patch:  # a bank that exists but that no group names changes nothing either
        patch.setattr(ca_controller.Controller, "_locate", staticmethod(lambda p, gen: setattr(gen, "needs_bank", True)))
        with layouts(patch) as seen:
            _, with_bank = generate(script, runner, prompt=NAMED)
    assert seen[0][1] is not None and torch.equal(pixels(processed), pixels(with_bank))


@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_a_batch_mixing_both_locates_every_image_and_says_how(host, sd_model, monkeypatch, batch_cond_uncond):
    """Rows of one UNet call with different token groups each get their own map columns."""
    runner, script = host
    shared.opts.batch_cond_uncond = batch_cond_uncond  # the host fixture resets the options per test
    with layouts(monkeypatch) as seen:
        p, processed = generate(script, runner, prompt=[NAMED, UNNAMED], batch_size=2, negative_prompt=["", ""])
    assert no_errors() and not comments_about_location(p)
    (masks, bank), = seen
    assert masks.shape[0] == 2 and every_region_placed(masks)
    assert callable(p.extra_generation_params[KEY])
    assert f'{KEY}: "{ALL_IN_PROMPT}"' in processed.infotexts[0]
    assert f'{KEY}: "{ALL_FROM_PHRASE}"' in processed.infotexts[1]
    assert ours(sd_model.model.diffusion_model) == 0


def test_a_region_named_in_the_prompt_keeps_its_tokens_the_others_come_from_their_phrase(host, sd_model, monkeypatch):
    runner, script = host
    with layouts(monkeypatch) as seen:
        p, _ = generate(script, runner, prompt="a knight with an upper body at dusk")
    assert p.extra_generation_params[KEY] == ("face: from the phrase, upper body: in the prompt, "
                                              "lower body: from the phrase")
    (masks, bank), = seen
    assert bank is not None and every_region_placed(masks)


@pytest.mark.parametrize("case", ["and", "hires", "break"])
def test_and_hires_and_break_prompts_without_region_phrases(host, sd_model, monkeypatch, case):
    runner, script = host
    kwargs = dict(prompt=UNNAMED, steps=2)
    if case == "and":
        kwargs["prompt"] = UNNAMED + " AND a castle"
    elif case == "break":
        kwargs["prompt"] = "a knight BREAK riding (a horse:1.2) at dusk"
    else:
        kwargs.update(enable_hr=True, hr_scale=2, hr_upscaler="Latent")
    with layouts(monkeypatch) as seen:
        p, processed = generate(script, runner, **kwargs)
    assert no_errors() and not comments_about_location(p)
    assert p.extra_generation_params[KEY] == ALL_FROM_PHRASE
    (masks, bank), = seen
    assert masks is not None and every_region_placed(masks)
    if case == "hires":
        assert masks.shape[-1] == 16 * 16  # the hires pass's own maps
    assert ours(sd_model.model.diffusion_model) == 0


def test_without_a_bank_a_missing_phrase_is_still_reported(host, sd_model, monkeypatch):
    """A prompt the run start did not foresee (as if another extension rewrote p.prompts after
    `process`) has no bank to locate from: the regions are reported, once each."""
    runner, script = host
    monkeypatch.setattr(ca_controller.Controller, "_locate", staticmethod(lambda p, gen: None))
    p, _ = generate(script, runner, prompt=UNNAMED, steps=3)
    assert len(comments_about_location(p)) == 3 and no_errors()


