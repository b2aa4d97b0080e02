"""The device work of one engine iteration: a batch of requests of one model advances by one
model evaluation — one backbone forward and one batched guidance + solver update
(`models.samplers.step_batch`, the same code path the offline sampling loop uses).

Each request keeps its own sampler state; requests with different samplers, step counts,
guidance scales and progress share the forward because their updates differ only in
per-sample coefficients.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from denoised.models.checkpoints.model_dir import LoadedModel
from denoised.models.conditioning import Conditioning, ModelInput, RowInputs, TextContext
from denoised.models.sampling.samplers import step_batch
from denoised.models.text.cache import PromptCache
from denoised.models.text.prompts import EncodedPrompt
from denoised.server.device import check_inputs
from denoised.server.engine.compiled import compile_backbone
from denoised.server.faults import Faults

log = logging.getLogger("denoised.engine")


@dataclass
class StepOutcome:
    predictions: list[torch.Tensor]  # per job: this evaluation's data prediction D, [n, C, H, W]
    failed: dict[int, str]  # job position → why it failed


class ModelRunner:
    """Owns one loaded model on the engine's device."""

    def __init__(
        self,
        model: LoadedModel,
        faults: Faults | None = None,
        compiled: bool = False,
        max_batch: int = 64,
        prompt_cache_bytes: int = 0,
    ) -> None:
        """`compiled`: run the backbone through `torch.compile` (`engine.compiled`), padded
        to buckets up to `max_batch` rows where CUDA graphs replay it."""
        self.model = model
        weight = next(model.backbone.parameters())
        self.device, self.dtype = weight.device, weight.dtype  # the dtype it was settled in
        # Text models run eager: the compiled wrapper pads tensor inputs only.
        compiled = compiled and model.text_dims is None
        self.compiled = compile_backbone(model.backbone, max_batch) if compiled else None
        self._backbone = self.compiled or model.backbone
        self._model_fn = (faults or Faults()).wrap(self._forward)
        # Text models: encoded prompts kept on the device for reuse (counted in the metrics).
        self.prompt_cache = PromptCache(prompt_cache_bytes) if model.text is not None else None

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: ModelInput | None) -> torch.Tensor:
        return self._backbone(x.to(self.dtype), t, y)

    def compile(self) -> float:
        """Compile (CUDA: and record) the backbone for every batch size it will see, before
        serving; seconds taken (0 when not compiled). A backbone that does not compile (no
        C++ compiler for inductor, an unsupported op) is served eager instead."""
        if self.compiled is None:
            return 0.0
        x, t, y = check_inputs(self.model)
        assert not isinstance(y, TextContext)  # text models are not compiled (`__init__`)
        y = None if y is None else y.to(self.device)
        try:
            return self.compiled.warm_up((x.to(self.device, self.dtype), t.to(self.device), y))
        except Exception:
            log.exception("compiling %s failed: serving it eager", self.model.name)
            self.compiled, self._backbone = None, self.model.backbone
            return 0.0

    def encode_prompts(self, jobs: Sequence) -> None:
        """Give text jobs their conditioning: every distinct prompt (and negative or empty
        prompt of the guided ones) not in the prompt cache is encoded in one batch per encoder.
        A backbone with a cross-attention cache gets that instead of the encoded tokens: its
        text K/V are then computed once per request, not once per step."""
        text = self.model.text
        assert text is not None  # the engine encodes prompts for text models only
        texts = [job.params.prompt for job in jobs]
        texts += [job.params.negative_prompt or "" for job in jobs if job.params.guided]
        encoded = dict(zip(texts, text.encode(texts, self.prompt_cache), strict=True))
        for job in jobs:
            p = job.params
            prompt = encoded[p.prompt]
            negative = encoded[p.negative_prompt or ""] if p.guided else prompt
            job.conditioning = Conditioning.prompts(
                p.n, self._text_input(prompt), self._text_input(negative), p.guidance_scale
            )
            job.prompt_tokens, job.truncated = prompt.num_tokens, prompt.truncated

    def _text_input(self, prompt: EncodedPrompt) -> RowInputs:
        context = prompt.context().to(self.device, self.dtype)  # the backbone's dtype
        cache = getattr(self.model.backbone, "text_cache", None)
        return context if cache is None else cache(context)

    @torch.inference_mode()
    def step(self, jobs: Sequence) -> StepOutcome:
        """Advance every job (anything with `.state` and `.params`) by one evaluation.

        Raises if the batch as a whole fails (the states are then unchanged: a sampler's
        noise for the pending evaluation is drawn once, so a retry is identical). A job whose
        new values are not finite is reported in `failed`; the others are unaffected."""
        states = [job.state for job in jobs]
        conditionings = [job.conditioning for job in jobs]
        d = step_batch(self._model_fn, states, conditionings, self.model.guided_channels)
        counts = [state.x.shape[0] for state in states]
        x_next = torch.cat([state.x for state in states])
        rows_ok = (torch.isfinite(x_next) & torch.isfinite(d)).flatten(1).all(1)
        ok = torch.stack([rows.all() for rows in rows_ok.split(counts)]).tolist()  # one sync
        failed = {
            i: "the sampler produced non-finite values (NaN or inf)"
            for i, good in enumerate(ok)
            if not good
        }
        return StepOutcome(list(d.split(counts)), failed)
