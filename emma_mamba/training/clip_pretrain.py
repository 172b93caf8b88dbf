"""Contrastive pretraining of a small open_clip CLIP (both towers) on image-caption pairs: a "stage 0".

EMMA-Mamba, like LLaVA and Cobra, starts from a *pretrained* CLIP: the vision tower gives the LM features that
already separate colours, shapes and layouts, and the text tower (instruction fusion) gives the instruction
features that say which of them matter. A random-initialised encoder gives neither, and a ViT learns slowly
from the LM's next-token loss alone (no convolutional prior: measured on ShapesWorld, a 3-block 32-px tiny
ViT trained end to end through a random LM stayed near chance on "is there a red circle?" after 3000 steps).
Where no CLIP checkpoint can be downloaded (the quickstart, tests, new image domains), this module trains one
with CLIP's own objective (Radford et al. 2021): the symmetric InfoNCE loss over the cosine similarities of
the normalised image and text embeddings of a batch, scaled by the learned temperature ``exp(logit_scale)``
(at most 100, as CLIP: the parameter is clamped to [0, ln 100] after every update, as open_clip's
training does). The result is an ordinary open_clip state dict, loaded by
``vision.pretrained`` exactly like a downloaded one.

    pretrain_clip(vision_cfg, captions_json, image_folder, out_file, steps=..., batch_size=..., lr=...)

Data: a LLaVA-format caption file (stage 1's): each record's image and its first assistant turn as the text.
Images are preprocessed once with the encoder's own eval transform and held in memory as float tensors, so a
step costs one forward/backward of the two small towers. Progress is a tqdm bar; the loss and
the in-batch image-to-text retrieval accuracy go to ``<out dir>/clip_metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from emma_mamba.config import VisionConfig
from emma_mamba.fileio import write_whole

__all__ = ["pretrain_clip", "clip_loss", "read_caption_pairs"]

log = logging.getLogger(__name__)


def read_caption_pairs(captions_json: str | Path, image_folder: str | Path) -> list[tuple[Path, str]]:
    """(image path, caption) per LLaVA record: the record's image and its first assistant ("gpt") turn.
    A record without an image or a caption is an error naming the file and the record index."""
    path = Path(captions_json)
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records")
    pairs = []
    for i, rec in enumerate(records):
        where = f"{path} record {i} (id {rec.get('id', '?')!r})" if isinstance(rec, dict) else f"{path} record {i}"
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise ValueError(f"{where}: needs an 'image' path")
        turns = rec.get("conversations", [])
        turns = turns if isinstance(turns, list) else []  # not a list of turns: no caption (named below)
        text = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: no assistant ('gpt') turn to use as the caption")
        image = Path(image_folder) / rec["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{where}: image {image} not found")
        pairs.append((image, text.strip()))
    if len(pairs) < 2:
        raise ValueError(f"{path}: contrastive training needs at least 2 captioned images, found {len(pairs)}")
    return pairs


_LOG_MAX_SCALE = math.log(100.0)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """Symmetric InfoNCE over a batch of L2-normalised (b, e) embeddings, pair i matching pair i.
    Returns (loss, image-to-text top-1 accuracy)."""
    logits = logit_scale.exp().clamp(max=100.0) * image_emb @ text_emb.t()  # (b, b)
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    acc = (logits.argmax(dim=1) == target).float().mean()
    return loss, acc


def pretrain_clip(vision_cfg: VisionConfig, captions_json: str | Path, image_folder: str | Path,
                  out_file: str | Path, *, steps: int, batch_size: int = 64, lr: float = 1e-3,
                  weight_decay: float = 0.1, warmup_steps: int = 50, seed: int = 0, device=None,
                  progress: bool = True) -> dict:
    """Trains the open_clip model of ``vision_cfg`` (random init, or ``vision_cfg.pretrained`` to continue)
    with the CLIP loss and writes its state dict to ``out_file``. AdamW (no decay on gains, biases, the
    temperature and embeddings' 1-D parameters), linear warmup then cosine decay. Returns a summary dict."""
    import open_clip
    from tqdm.auto import tqdm

    from emma_mamba.models.vision import ImageProcessor, build_open_clip
    from emma_mamba.training.optim import lr_lambda

    if steps < 1 or batch_size < 2:
        raise ValueError(f"pretrain_clip: steps must be >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or "cpu")
    torch.manual_seed(seed)
    model, preprocess_cfg = build_open_clip(vision_cfg, device=device)
    model.train()
    tokenizer = open_clip.get_tokenizer(vision_cfg.model_name, context_length=model.context_length)
    pairs = read_caption_pairs(captions_json, image_folder)
    processor = ImageProcessor(preprocess_cfg)
    t0 = time.perf_counter()
    images = torch.cat([processor([p for p, _ in pairs[i:i + 256]]) for i in range(0, len(pairs), 256)])
    texts = tokenizer([c for _, c in pairs])  # (n, context_length); longer captions are cut (counted below)
    n_cut = int((texts[:, -1] != 0).sum())  # the last slot is filled only when the caption reached the limit
    log.info("CLIP pretraining: %d pairs loaded in %.1fs; %d captions reach the %d-token text context",
             len(pairs), time.perf_counter() - t0, n_cut, model.context_length)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, steps, warmup_steps))
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(pairs))
    order, pos = torch.randperm(len(pairs), generator=gen), 0
    metrics_path = out_file.parent / "clip_metrics.jsonl"
    history = []
    bar = tqdm(range(steps), desc="stage 0 (CLIP)", disable=not progress, dynamic_ncols=True)
    with metrics_path.open("w") as mf:
        for step in bar:
            if pos + bs > len(order):  # a new epoch: reshuffle (every batch has bs distinct pairs)
                order, pos = torch.randperm(len(pairs), generator=gen), 0
            idx = order[pos:pos + bs]
            pos += bs
            img = model.encode_image(images[idx].to(device), normalize=True)
            txt = model.encode_text(texts[idx].to(device), normalize=True)
            loss, acc = clip_loss(img, txt, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr_used = sched.get_last_lr()[0]  # this update's lr (after sched.step() it is the next one's)
            opt.step()
            sched.step()
            with torch.no_grad():  # as open_clip's training: the parameter itself stays at or below ln 100 (the
                model.logit_scale.clamp_(0, _LOG_MAX_SCALE)  # loss's cap alone has no gradient past it: stuck)
            m = {"step": step + 1, "loss": loss.item(), "i2t_acc": acc.item(), "lr": lr_used,
                 "temperature": model.logit_scale.exp().item()}
            history.append(m)
            mf.write(json.dumps(m) + "\n")
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc=f"{m['i2t_acc']:.2f}")
    # whole or not at all: a file cut off by a kill is never found under the checkpoint's name
    write_whole(out_file, lambda tmp: torch.save(model.state_dict(), tmp))
    tail = history[-20:]
    return {"steps": steps, "batch_size": bs, "pairs": len(pairs), "captions_cut": n_cut,
            "first_loss": history[0]["loss"], "last_loss": sum(h["loss"] for h in tail) / len(tail),
            "last_i2t_acc": sum(h["i2t_acc"] for h in tail) / len(tail), "checkpoint": str(out_file),
            "metrics": str(metrics_path)}
