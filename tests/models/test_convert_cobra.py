"""`emma-mamba convert cobra`: a Cobra (Prismatic) checkpoint written here in Cobra's own layout (projector +
``llm.backbone.*`` mamba-ssm names, config.json of the run) is converted, and the converted model must compute what
Cobra computes, checked by an oracle built independently of our model: the towers' block outputs from the weight
files (open_clip hooks, timm's ``get_intermediate_layers`` as Cobra calls it) on images resized as Cobra's
resize-naive transform does, ``cat([dino, siglip])`` through the projector written out by hand, and
transformers' MambaForCausalLM on the LM weights, fed the image before the Zephyr prompt."""

from __future__ import annotations

import gzip
import json
import os

import open_clip
import pytest
import skimage
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import emma_mamba
from emma_mamba.config import ConfigError, SecondEncoderConfig, get_preset, save_config
from emma_mamba.convert import ConversionError, convert_cobra
from emma_mamba.models.vision import build_open_clip
from tests.models.test_vision import _hooked_blocks

DATA = os.path.dirname(skimage.data.__file__)
ASTRONAUT = os.path.join(DATA, "astronaut.png")
DINO = "vit_small_patch14_reg4_dinov2"
TINY_DINO = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 3, "num_heads": 2}
QUESTION = "What is in the image?"
COBRA_PROMPT = f"<|user|>\n{QUESTION}<|endoftext|>\n<|assistant|>\n"  # Cobra's ZephyrChatPromptBuilder


def _base_cfg():
    cfg = get_preset("tiny")  # open_clip tower (the SigLIP stand-in): 32 px, 8 px patches, 3 blocks of width 32
    cfg.vision.taps = [-2]
    cfg.vision.second_encoder = SecondEncoderConfig(timm_model=DINO, timm_kwargs=dict(TINY_DINO), taps=[-2])
    return cfg.validate()


def _hf_lm(seed=0):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    hf = MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=64, num_hidden_layers=2, state_size=8,
                                      conv_kernel=4, expand=2, use_conv_bias=True, use_bias=False,
                                      tie_word_embeddings=True)).eval()
    with torch.no_grad():  # not the init's ones / constants: a wrongly mapped norm or D changes the logits
        for n, p in hf.named_parameters():
            if n.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.add_(0.3 * torch.randn_like(p))
    return hf


def _cobra_llm_state(hf) -> dict:
    """transformers' names -> mamba-ssm's under Cobra's ``llm.`` (MambaLLMBackbone.llm = MambaForCausalLM)."""
    out = {}
    for k, v in hf.state_dict().items():
        k = k.replace("backbone.embeddings.", "backbone.embedding.")
        out["llm." + k] = v.clone()
    out["llm.lm_head.weight"] = out["llm.backbone.embedding.weight"].clone()  # the tied copy torch.save keeps
    return out


@pytest.fixture(scope="module")
def cobra(tmp_path_factory):
    """A tiny Cobra run directory, the vision weight files, and the oracle's pieces."""
    d = tmp_path_factory.mktemp("cobra")
    cfg = _base_cfg()
    torch.manual_seed(3)
    clip, pp = build_open_clip(cfg.vision)
    torch.save(clip.state_dict(), d / "clip.pth")
    dino = timm.create_model(DINO, **TINY_DINO, num_classes=0).eval()
    torch.save(dino.state_dict(), d / "dino.pth")
    hf = _hf_lm()
    g = torch.Generator().manual_seed(4)
    w = [torch.randn(224, 56, generator=g) * 0.2, torch.randn(64, 224, generator=g) * 0.1,
         torch.randn(64, 64, generator=g) * 0.2]
    b = [torch.randn(224, generator=g) * 0.1, torch.randn(64, generator=g) * 0.1, torch.randn(64, generator=g) * 0.1]
    projector = {f"projector.{2 * i}.{n}": t for i in range(3) for n, t in (("weight", w[i]), ("bias", b[i]))}
    run = d / "cobra+tiny"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"model": {"projector": projector, "llm_backbone": _cobra_llm_state(hf)}},
               run / "checkpoints" / "latest-checkpoint.pt")
    (run / "config.json").write_text(json.dumps({"model": {
        "model_id": "cobra+tiny", "arch_specifier": "no-align+fused-gelu-mlp",
        "vision_backbone_id": "dinosiglip-vit-so-384px", "llm_backbone_id": "mamba-2.8b-zephyr",
        "image_resize_strategy": "resize-naive", "llm_max_length": 2048}}))
    out = d / "converted"
    convert_cobra(run, out, vision_weights=str(d / "clip.pth"), dino_weights=str(d / "dino.pth"), base=_base_cfg())
    return dict(dir=d, run=run, out=out, pp=pp, w=w, b=b, hf=hf)


def _cobra_reference(c, image: Image.Image, prompt_ids: list[int]):
    """Cobra's forward, from the weight files: (inputs_embeds, the LM's logits)."""
    cfg = _base_cfg()
    cfg.vision.pretrained = str(c["dir"] / "clip.pth")
    clip = open_clip.create_model(cfg.vision.model_name, pretrained=cfg.vision.pretrained,
                                  **{"vision_cfg": cfg.vision.open_clip_overrides["vision_cfg"],
                                     "text_cfg": cfg.vision.open_clip_overrides["text_cfg"],
                                     "embed_dim": 32}).eval()
    dino = timm.create_model(DINO, **TINY_DINO, num_classes=0).eval()
    dino.load_state_dict(torch.load(c["dir"] / "dino.pth"))

    def resize_naive(mean, std):  # Prismatic's resize-naive: Resize((s, s)) (bicubic) + ToTensor + Normalize
        return T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                          T.Normalize(mean, std)])

    x_clip = resize_naive(c["pp"]["mean"], c["pp"]["std"])(image)[None]
    x_dino = resize_naive(timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)(image)[None]
    with torch.no_grad():
        outs = _hooked_blocks(clip.visual.transformer.resblocks, lambda: clip.visual(x_clip))
        f_clip = outs[1][:, 1:]  # block -2 of 3, the class token dropped
        (f_dino,) = dino.get_intermediate_layers(x_dino, n={len(dino.blocks) - 2})  # Cobra's call
        h = torch.cat([f_dino, f_clip], dim=-1)  # Prismatic's DinoSigLIP order
        w, b = c["w"], c["b"]
        h = F.gelu(F.linear(h, w[0], b[0]))
        h = F.gelu(F.linear(h, w[1], b[1]))
        visual = F.linear(h, w[2], b[2])
        hf = c["hf"]
        text = hf.get_input_embeddings()(torch.tensor([prompt_ids]))
        embeds = torch.cat([visual, text], dim=1)
        return embeds, hf(inputs_embeds=embeds).logits


def _gpt_neox_ids(text: str) -> list[int]:
    from tokenizers import Tokenizer

    path = os.path.join(os.path.dirname(emma_mamba.__file__), "assets", "gpt-neox-20b-tokenizer.json.gz")
    with gzip.open(path, "rt") as f:
        return Tokenizer.from_str(f.read()).encode(text).ids


def test_converted_model_computes_cobras_forward_and_greedy_answer(cobra):
    model = emma_mamba.load(cobra["out"])
    cfg = model.config
    assert (cfg.mff.mode, cfg.instruction.enabled, cfg.projector.kind, cfg.vision.image_position,
            cfg.vision.image_resize) == ("none", False, "fused", "before_turn", "squash")
    prompt = model.build_prompt(QUESTION)
    assert prompt == "<image>" + COBRA_PROMPT  # the image before Cobra's whole Zephyr prompt
    image = Image.open(ASTRONAUT).convert("RGB")
    ids = _gpt_neox_ids(COBRA_PROMPT)
    assert ids.count(0) == 1  # <|endoftext|> is the special token 0, as in Cobra's tokenizer
    ref_embeds, ref_logits = _cobra_reference(cobra, image, ids)

    embeds = model.prompt_embeds(prompt, [image])
    assert embeds.shape == ref_embeds.shape == (1, 16 + len(ids), 64)
    torch.testing.assert_close(embeds, ref_embeds, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        logits = model.lm(inputs_embeds=embeds).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)

    # greedy answer (Cobra's generate: greedy, stop at <|endoftext|>) against argmax of full forwards
    hf, seq = cobra["hf"], ref_embeds
    want = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(hf(inputs_embeds=seq).logits[0, -1].argmax())
            want.append(nxt)
            if nxt == 0:
                break
            seq = torch.cat([seq, hf.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
    from emma_mamba.inference.generate import GenerationConfig

    got = model.generate(prompt, [image], config=GenerationConfig(max_new_tokens=6, eos_token_id=0))
    # EOS (id 0) ends the answer and is not part of it
    assert got.sequences[0] == [t for t in want if t != 0]
    assert got.finish_reasons[0] == ("eos" if want[-1] == 0 else "length")


def test_without_rotating_the_projector_input_the_answer_differs(cobra):
    # the [DINOv2, SigLIP] -> [open_clip, timm] column rotation is load-bearing: the checkpoint's own first layer
    # applied to our concatenation order gives other visual tokens
    model = emma_mamba.load(cobra["out"])
    w_ours = model.projector.mlp[0].weight
    w_cobra = cobra["w"][0]
    torch.testing.assert_close(w_ours[:, :32], w_cobra[:, 24:], rtol=0, atol=0)
    torch.testing.assert_close(w_ours[:, 32:], w_cobra[:, :24], rtol=0, atol=0)
    assert not torch.allclose(w_ours, w_cobra[:, :56])


def test_cli_writes_a_checkpoint_that_generate_runs(cobra, tmp_path, capsys):
    from emma_mamba.cli import main

    base = tmp_path / "base.yaml"
    save_config(_base_cfg(), base)
    out = tmp_path / "cli"
    assert main(["convert", "cobra", "--checkpoint", str(cobra["run"]), "--out", str(out), "--config", str(base),
                 "--vision-weights", str(cobra["dir"] / "clip.pth"), "--dino-weights", str(cobra["dir"] / "dino.pth"),
                 "--dtype", "bf16"]) == 0
    said = capsys.readouterr().out
    assert "LM 64 x 2, projector fused" in said and "image before the user turn" in said
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["source"] == "cobra"
        assert f.get_tensor("lm.layers.0.mixer.A_log").dtype == torch.float32  # SSM parameters stay fp32
        assert f.get_tensor("projector.mlp.0.weight").dtype == torch.bfloat16
    assert main(["generate", "--checkpoint", str(out), "--image", ASTRONAUT, "--prompt", QUESTION,
                 "--max-new-tokens", "3"]) == 0
    # the existing output is refused, nothing overwritten
    assert main(["convert", "cobra", "--checkpoint", str(cobra["run"]), "--out", str(out), "--config", str(base),
                 "--random-vision"]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def _write_run(d, projector=None, llm=None, extra=None, config=None):
    run = d / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    model = {"projector": projector, "llm_backbone": llm, **(extra or {})}
    torch.save({"model": model}, run / "checkpoints" / "latest-checkpoint.pt")
    if config is not None:
        (run / "config.json").write_text(json.dumps({"model": config}))
    return run


def _good_pieces():
    hf = _hf_lm(1)
    g = torch.Generator().manual_seed(5)
    proj = {"projector.0.weight": torch.randn(224, 56, generator=g), "projector.0.bias": torch.zeros(224),
            "projector.2.weight": torch.randn(64, 224, generator=g), "projector.2.bias": torch.zeros(64),
            "projector.4.weight": torch.randn(64, 64, generator=g), "projector.4.bias": torch.zeros(64)}
    return proj, _cobra_llm_state(hf)


def test_errors_name_the_file_and_what_is_wrong(tmp_path):
    proj, llm = _good_pieces()
    base = _base_cfg

    run = _write_run(tmp_path / "a", proj, llm)
    with pytest.raises(ConversionError, match="holds no vision weights.*--vision-weights and --dino-weights"):
        convert_cobra(run, tmp_path / "o1", base=base())

    bad_head = dict(llm, **{"llm.lm_head.weight": llm["llm.lm_head.weight"] + 1})
    run = _write_run(tmp_path / "b", proj, bad_head)
    with pytest.raises(ConversionError, match="lm_head.weight differs from the embedding"):
        convert_cobra(run, tmp_path / "o2", base=base(), random_vision=True)

    narrow = dict(proj, **{"projector.0.weight": torch.randn(224, 40)})
    run = _write_run(tmp_path / "c", narrow, llm)
    with pytest.raises(ConversionError, match="takes 40 features but the vision towers .* give 56 \\(32 \\+ 24\\)"):
        convert_cobra(run, tmp_path / "o3", base=base(), random_vision=True)

    run = _write_run(tmp_path / "d", proj, llm, extra={"vision_backbone": {"x": torch.zeros(1)}})
    with pytest.raises(ConversionError, match="full-finetune"):
        convert_cobra(run, tmp_path / "o4", base=base(), random_vision=True)

    run = _write_run(tmp_path / "e", proj, llm, config={"arch_specifier": "gelu-mlp"})
    with pytest.raises(ConversionError, match="says 'gelu-mlp' but the projector's layers are fused-gelu-mlp's"):
        convert_cobra(run, tmp_path / "o5", base=base(), random_vision=True)

    linear = {"projector.weight": torch.randn(64, 56), "projector.bias": torch.zeros(64)}  # Prismatic's linear
    run = _write_run(tmp_path / "lin", linear, llm)
    with pytest.raises(ConversionError, match="'projector.weight' is a linear projector's \\(one layer\\): only the "
                                              "gelu-mlp and fused-gelu-mlp projectors are supported"):
        convert_cobra(run, tmp_path / "o5b", base=base(), random_vision=True)

    run = _write_run(tmp_path / "f", proj, llm, config={"vision_backbone_id": "in1k-vit-l"})
    with pytest.raises(ConversionError, match="vision_backbone_id 'in1k-vit-l'; supported: dinosiglip-vit-so-384px"):
        convert_cobra(run, tmp_path / "o6", random_vision=True)

    no_layer = {k: v for k, v in llm.items() if not k.startswith("llm.backbone.layers.1.")}
    no_layer["llm.backbone.layers.2.norm.weight"] = torch.ones(64)
    run = _write_run(tmp_path / "g", proj, no_layer)
    with pytest.raises(ConversionError, match="block indices are not 0..n-1"):
        convert_cobra(run, tmp_path / "o7", base=base(), random_vision=True)

    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="x.pt: not a readable torch checkpoint"):
        convert_cobra(tmp_path / "h" / "x.pt", tmp_path / "o8", base=base(), random_vision=True)
    with pytest.raises(ConversionError, match="no checkpoints/latest-checkpoint.pt"):
        convert_cobra(tmp_path / "h", tmp_path / "o9", base=base(), random_vision=True)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 10))  # nothing half-written


def test_preset_is_cobras_architecture():
    from emma_mamba.models.vlm import EmmaMamba

    cfg = get_preset("cobra-3b")
    m = EmmaMamba(cfg, for_training=False, device="meta")
    assert (m.vision.num_tokens, m.vision.width, m.vision.image_size) == (729, 1152 + 1024, (384, 384))
    assert m.vision.taps == [25] and m.vision.second_taps == [22]  # the penultimate block of 27 and of 24
    widths = [(l.in_features, l.out_features) for l in m.projector.mlp if isinstance(l, torch.nn.Linear)]
    assert widths == [(2176, 8704), (8704, 2560), (2560, 2560)]  # Prismatic's FusedMLPProjector
    assert m.instruction is None and m.align_head is None
    assert (cfg.vision.image_position, cfg.vision.image_resize) == ("before_turn", "squash")
    assert m.lm.config.n_layer == 64 and m.lm.config.d_model == 2560


def test_preset_preprocessing_is_cobras_resize_naive_transform():
    # Cobra's DinoSigLIP transform rebuilt from timm's own pretrained configs of both towers (Prismatic's code
    # path: timm's eval transform with its Resize replaced by Resize((384, 384))) against our two inputs
    from emma_mamba.models.vision import ImageProcessor

    cfg = get_preset("cobra-3b")
    _, pp = build_open_clip(cfg.vision, device="meta")
    ours = ImageProcessor(pp)
    image = Image.open(ASTRONAUT).convert("RGB").crop((0, 0, 512, 300))  # not square: squash vs crop matters
    x_sig = ours([image])

    def prismatic(name):
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, num_classes=0, img_size=384)
        data_cfg = timm.data.resolve_model_data_config(m)
        data_cfg["input_size"] = (3, 384, 384)
        t = timm.data.create_transform(**data_cfg, is_training=False)
        assert isinstance(t.transforms[0], T.Resize)
        return T.Compose([T.Resize((384, 384), interpolation=t.transforms[0].interpolation), *t.transforms[1:]])

    want_sig = prismatic("vit_so400m_patch14_siglip_384")(image)[None]
    want_dino = prismatic("vit_large_patch14_reg4_dinov2.lvd142m")(image)[None]
    torch.testing.assert_close(x_sig, want_sig, rtol=0, atol=1e-5)
    from emma_mamba.models.vlm import EmmaMamba

    m = EmmaMamba(cfg, for_training=False, device="meta")
    scale, shift = m.vision.second_affine
    x_dino = x_sig * torch.tensor(scale)[:, None, None] + torch.tensor(shift)[:, None, None]
    torch.testing.assert_close(x_dino, want_dino, rtol=0, atol=1e-5)


def test_more_mistakes_are_named_and_leave_nothing_behind(cobra, tmp_path, monkeypatch):
    proj, llm = _good_pieces()
    base, d = _base_cfg, cobra["dir"]
    run = _write_run(tmp_path / "a", proj, llm, config={"llm_backbone_id": "mamba-2.8b"})
    with pytest.raises(ConversionError, match="llm_backbone_id 'mamba-2.8b'.*'In: ... Out:'"):
        convert_cobra(run, tmp_path / "o1", base=base(), random_vision=True)
    nan = dict(llm, **{"llm.backbone.layers.0.mixer.D": torch.full((128,), float("nan"))})
    run = _write_run(tmp_path / "b", proj, nan)
    with pytest.raises(ConversionError, match="llm_backbone tensor 'llm.backbone.layers.0.mixer.D' holds NaN"):
        convert_cobra(run, tmp_path / "o2", base=base(), random_vision=True)
    run = _write_run(tmp_path / "c", dict(proj, **{"projector.0.bias": torch.zeros(224, dtype=torch.long)}), llm)
    with pytest.raises(ConversionError, match="projector entry 'projector.0.bias' is a torch.int64 tensor"):
        convert_cobra(run, tmp_path / "o3", base=base(), random_vision=True)
    run = _write_run(tmp_path / "d", proj, dict(llm, **{"llm.backbone.layers.x.norm.weight": torch.ones(64)}))
    with pytest.raises(ConversionError, match="'x' is not a layer index"):
        convert_cobra(run, tmp_path / "o4", base=base(), random_vision=True)
    run = _write_run(tmp_path / "e", proj, llm)
    with pytest.raises(ValueError, match="--random-vision and --vision-weights / --dino-weights exclude each other"):
        convert_cobra(run, tmp_path / "o5", base=base(), random_vision=True, vision_weights=str(d / "clip.pth"))
    with pytest.raises(ConversionError, match="only vision settings may be overridden"):
        convert_cobra(run, tmp_path / "o6", base=base(), random_vision=True, overrides=["lm.d_model=128"])
    big = dict(proj, **{"projector.4.weight": proj["projector.4.weight"] * 1e6})
    run = _write_run(tmp_path / "f", big, llm)
    with pytest.raises(ConversionError, match="overflow fp16.*--dtype bf16 or fp32"):
        convert_cobra(run, tmp_path / "o7", base=base(), random_vision=True, dtype="fp16")
    (tmp_path / "garbage.bin").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConfigError, match="vision.pretrained: .*garbage.bin could not be loaded into open_clip"):
        convert_cobra(run, tmp_path / "o8", base=base(), vision_weights=str(tmp_path / "garbage.bin"),
                      dino_weights=str(d / "dino.pth"))
    # a failure while writing: no half-written output (a rerun is not refused)
    import emma_mamba.fileio as fileio

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio, "save_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert_cobra(_write_run(tmp_path / "g", proj, llm), tmp_path / "o9", base=base(), random_vision=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == []
