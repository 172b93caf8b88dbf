"""An lmms-eval model (``--model emma_mamba``): any of lmms-eval's image benchmarks on an EmmaMamba checkpoint.

`lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_ (``pip install lmms-eval``; 0.7 tested) finds this
class through the ``lmms_eval.models`` entry point that emma_mamba's setup.py declares, so with both installed::

    python -m lmms_eval --model emma_mamba --model_args pretrained=runs/stage2 \\
        --tasks pope,mme,scienceqa_img --batch_size 8 --output_path results/
    torchrun --nproc_per_node 8 -m lmms_eval --model emma_mamba ...   # one GPU per process, documents sharded

``--model_args`` (comma-separated ``key=value``): ``pretrained`` (a checkpoint directory written by training,
``EmmaMamba.save`` or ``emma-mamba export``; required), ``device`` (default: this process's GPU, else the CPU),
``dtype`` (``auto``: bf16 on a GPU, fp32 on the CPU; or fp32 / bf16 / fp16), ``max_new_tokens`` (a reply's
limit where the task sets none; 256), ``cuda_graphs`` (decode from captured CUDA graphs: True / False).
``--batch_size`` replies decode together. The kernels are the usual dispatch's (``EMMA_MAMBA_BACKEND`` applies).

How the requests are answered (the same as ``emma-mamba eval``):

* ``generate_until``: the task's context becomes the user turn of the model's chat prompt with one image
  placeholder per image of the document (any ``<image>`` the context holds is removed first: the placeholders
  go where training put them, :meth:`EmmaMamba.build_prompt`); instruction fusion sees the context as each
  image's instruction. Greedy unless the task asks for sampling (``do_sample`` / ``temperature``, ``top_p``);
  ``until`` are stop strings (the reply is cut before them), ``max_new_tokens`` the task's; the reply is
  returned stripped of surrounding whitespace, with its token counts (input: the prompt's positions, visual tokens
  included; output: the reply's tokens), which lmms-eval logs per sample. Beam search (``num_beams`` > 1) is
  refused.
* ``loglikelihood``: the continuation is scored as a reply: its text (leading whitespace removed, lmms-eval's
  target delimiter) tokenised on its own after the prompt, as training tokenises an answer; returns the sum of
  its tokens' log-probabilities over the real vocabulary and whether greedy decoding would produce exactly those
  tokens.
* ``generate_until_multi_round`` is not supported (an error naming the task).

Documents whose visuals are not images (video paths, audio) are refused naming the task and document.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch

try:
    from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
    from lmms_eval.api.model import lmms
except ImportError as e:  # the class subclasses lmms-eval's: this module exists for lmms-eval only
    raise ImportError(f"emma_mamba.eval.lmms_eval_model is the lmms-eval model and needs lmms-eval ({e}): "
                      f"pip install \"lmms-eval>=0.7.3,<0.8\" \"filelock<4\" (filelock 4 removed what lmms-eval "
                      f"0.7 imports)") from e

MODEL_ID = "emma_mamba"


def manifest():
    """The ``lmms_eval.models`` entry point's payload: this class under the name ``emma_mamba``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.EmmaMambaLMMS")


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"emma_mamba model_args: {name}={value!r} is not True or False")


def pick_device(device: str | None, cuda_available: bool, env=os.environ) -> torch.device:
    """This process's device: ``device`` as given, but a bare ``cuda`` (lmms-eval's ``--device cuda``) or none
    means this process's GPU under torchrun / accelerate (``LOCAL_RANK``), so N processes use N GPUs; none and no
    GPU: the CPU."""
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    if str(device) == "cuda":
        device = f"cuda:{local_rank}"
    return torch.device(device)


class EmmaMambaLMMS(lmms):
    """lmms-eval's ``lmms`` interface over :class:`emma_mamba.models.vlm.EmmaMamba` (see the module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_new_tokens: int | str = 256, cuda_graphs: bool | str = False,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"emma_mamba model_args: unknown {', '.join(sorted(unknown))} (known: pretrained, "
                            f"device, dtype, max_new_tokens, cuda_graphs; and lmms-eval's --batch_size)")
        if not pretrained:
            raise ValueError("emma_mamba model_args: pretrained=DIR (an EmmaMamba checkpoint directory) is required")
        from emma_mamba.inference.cli_generate import _DTYPES  # the dtype names the commands' --dtype takes
        from emma_mamba.models.vlm import load

        try:
            self.batch_size_per_gpu = int(batch_size)
            self.max_new_tokens = int(max_new_tokens)
        except (TypeError, ValueError):
            raise ValueError(f"emma_mamba: batch_size={batch_size!r} and max_new_tokens={max_new_tokens!r} must be "
                             f"whole numbers (lmms-eval's batch_size 'auto' is not supported)") from None
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise ValueError(f"emma_mamba: batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be "
                             f">= 1")
        self._device = pick_device(device, torch.cuda.is_available())
        key = str(dtype).strip().lower()
        if key == "auto":
            self._dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        elif key in _DTYPES:
            self._dtype = getattr(torch, _DTYPES[key])
        else:
            raise ValueError(f"emma_mamba model_args: dtype={dtype!r} (auto, fp32, bf16 or fp16)")
        self.cuda_graphs = _flag(cuda_graphs, "cuda_graphs")
        if self.cuda_graphs and self._device.type != "cuda":
            raise ValueError(f"emma_mamba model_args: cuda_graphs needs a CUDA device (device={self._device})")
        self.model = load(pretrained, device=self._device, dtype=self._dtype).eval()
        self.pretrained = str(pretrained)
        self.tokenizer = self.model.tokenizer
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------------------ requests

    def _visuals(self, doc_to_visual, doc_id, task: str, split: str) -> list:
        """The document's images as RGB PIL images (decoded as training decodes them)."""
        from PIL import Image

        from emma_mamba.models.vision import load_image

        got = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        flat: list = []
        stack = [got] if got is not None else []
        while stack:  # nested lists flattened in order
            v = stack.pop(0)
            if isinstance(v, (list, tuple)):
                stack[:0] = list(v)
            elif v is not None:
                flat.append(v)
        for v in flat:
            if not isinstance(v, Image.Image):
                raise ValueError(f"emma_mamba: task {task!r} document {doc_id!r} ({split}) gives a visual of type "
                                 f"{type(v).__name__} ({str(v)[:80]!r}): EmmaMamba reads images only (PIL images; "
                                 f"not videos or audio)")
        return [load_image(v) for v in flat]

    def _prompt(self, context: str, n_images: int) -> tuple[str, list[str] | None]:
        """The chat prompt for ``context`` with ``n_images`` placeholders, and instruction fusion's texts."""
        token = self.model.config.image_token
        text = context
        if token in text:  # placeholders go where training puts them, not where a task's template wrote them
            text = "\n".join(line.replace(token, "").strip() if token in line else line
                             for line in text.split("\n")).strip("\n")
        instructions = [text] * n_images if self.model.instruction is not None else None
        return self.model.build_prompt(text, n_images), instructions

    def _generation_config(self, gen_kwargs: dict, task: str):
        from emma_mamba.inference.generate import GenerationConfig

        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"emma_mamba: task {task!r}: generation_kwargs until must be a string or a list of "
                             f"strings, got {until!r}")
        beams = int(kw.pop("num_beams", 1) or 1)
        if beams > 1:
            raise ValueError(f"emma_mamba: task {task!r} asks for beam search (num_beams={beams}); EmmaMamba decodes "
                             f"greedily or by sampling (set num_beams: 1)")
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        if not _flag(kw.pop("do_sample", temperature > 0), "do_sample"):
            temperature = 0.0
        top_p = kw.pop("top_p", None)
        max_new = kw.pop("max_new_tokens", None)
        return self.model.stops(GenerationConfig(
            max_new_tokens=int(max_new) if max_new is not None else self.max_new_tokens, temperature=temperature,
            top_p=1.0 if top_p is None else float(top_p), stop_strings=tuple(u for u in until if u),
            cuda_graphs=self.cuda_graphs))

    def generate_until(self, requests: Sequence[Instance]) -> list[GenerationResult]:
        """One reply per request, in the requests' order; requests of the same generation settings decode
        together, ``batch_size`` at a time."""
        from tqdm.auto import tqdm

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            args = req.args
            if len(args) != 6:
                raise ValueError(f"emma_mamba: a generate_until request of {len(args)} arguments (expected context, "
                                 f"generation_kwargs, doc_to_visual, doc_id, task, split)")
            groups.setdefault(json.dumps(args[1], sort_keys=True, default=str), []).append(i)
        out: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="emma_mamba generate_until")
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size_per_gpu):
                chunk = idx[s:s + self.batch_size_per_gpu]
                prompts, images, instructions = [], [], []
                cfg = None
                for i in chunk:
                    context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
                    ims = self._visuals(doc_to_visual, doc_id, task, split)
                    prompt, instr = self._prompt(context, len(ims))
                    prompts.append(prompt)
                    images.append(ims)
                    instructions.append(instr)
                    cfg = cfg or self._generation_config(gen_kwargs, task)
                fused = self.model.instruction is not None  # (else _prompt gave None for each)
                result = self.model.generate(prompts, images, instructions if fused else None, config=cfg)
                for i, text, seq, n_in in zip(chunk, result.texts, result.sequences, result.prompt_lengths):
                    out[i] = GenerationResult(text.strip(), TokenCounts(input_tokens=n_in, output_tokens=len(seq)))
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], out[i].text)
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[Instance]) -> list[tuple[float, bool]]:
        """(log P(continuation | context, images), greedy) per request. The requests of one document with one
        context (a multiple-choice question's options) share one prefill: the images are encoded and the prompt
        run once, and each continuation continues a copy of the prompt's recurrent state
        (:func:`~emma_mamba.inference.generate.option_logprobs`)."""
        from tqdm.auto import tqdm

        from emma_mamba.inference.generate import option_logprobs

        groups: dict[tuple, list[tuple[int, str, list[int]]]] = {}
        for i, req in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target(doc) if callable(target) else target
            if isinstance(continuation, (list, tuple)):  # some tasks list the accepted answers: the first is scored
                continuation = continuation[0] if continuation else ""
            continuation = str(continuation).lstrip()
            cont_ids = self.tokenizer.encode(continuation) if continuation else []
            if not cont_ids:
                raise ValueError(f"emma_mamba: task {task!r} document {doc_id!r}: an empty continuation cannot be "
                                 f"scored")
            groups.setdefault((task, split, doc_id, context), []).append((i, continuation, cont_ids))
        res: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="emma_mamba loglikelihood")
        for (task, split, doc_id, context), members in groups.items():
            ims = self._visuals(requests[members[0][0]].args[2], doc_id, task, split)
            prompt, instr = self._prompt(context, len(ims))
            embeds = self.model.batch_embeds([self.tokenizer.encode(prompt)], [ims],
                                             None if instr is None else [instr])
            logp, greedy = option_logprobs(self.model.lm, [ids for _, _, ids in members], inputs_embeds=embeds,
                                           greedy=True)
            for j, (i, continuation, _) in enumerate(members):
                res[i] = (float(logp[0, j]), bool(greedy[0, j]))
                self.cache_hook.add_partial("loglikelihood", (context, continuation), res[i])
            bar.update(len(members))
        bar.close()
        return res  # type: ignore[return-value]

    def generate_until_multi_round(self, requests) -> list[str]:
        task = requests[0].args[-2] if requests else "?"
        raise NotImplementedError(f"emma_mamba: task {task!r} is multi-round (generate_until_multi_round), which "
                                  f"this model does not implement; its single-round tasks run")
