"""What a training step counts: its FLOPs (StepMeter, on a shape-only twin of the model) and the
micro-batches of its accumulation window (StepWindow: their FLOPs, tokens, shapes and losses)."""

from __future__ import annotations

import torch

from model.dit import DiT
from profiling.measure import FlopMeter, forward_backward
from profiling.parts import FROZEN


class StepWindow:
    """One optimizer step's micro-batches on this rank (grad_accum of them): FLOPs, tokens, the
    latent shapes they had and their losses."""

    def __init__(self) -> None:
        self.flops, self.tokens, self.shapes, self.losses = None, 0, [], []
        self.sources, self.seeds = [], []  # the batch's identity, for a non-finite step's message

    def add(self, flops, tokens: int, latent_shape: tuple[int, ...]) -> None:
        self.flops = flops if self.flops is None else self.flops + flops
        self.tokens += tokens
        self.shapes.append(latent_shape)

    def totals(self, device, stop: bool = False) -> torch.Tensor:
        """[sum of micro-batch losses, micro-batches, samples, stop requested] on this rank, to be
        summed over ranks (a stop request rides along: every rank learns of it at the same step)."""
        return torch.stack(
            [
                torch.stack(self.losses).sum(),
                torch.tensor(float(len(self.losses)), device=device),
                torch.tensor(float(sum(s[0] for s in self.shapes)), device=device),
                torch.tensor(float(stop), device=device),
            ]
        )

    def shape(self, grad_accum: int, samples_per_step: int) -> str:
        """The ledger's shape label: micro-batch size, samples per optimizer step (all ranks) and
        latent size, e.g. 'B=2 x2 accum, 8 samples/step, latent=1x16x16'."""
        sizes = sorted({s[0] for s in self.shapes})
        latents = "+".join(sorted({"x".join(map(str, s[2:])) for s in self.shapes}))
        accum = f" x{grad_accum} accum" if grad_accum > 1 else ""
        return f"B={'/'.join(map(str, sizes))}{accum}, {samples_per_step} samples/step, latent={latents}"


class StepMeter:
    """FLOPs of one micro-step, counted once per (batch, latent, text) shape on fake tensors."""

    def __init__(self, model_cfg, codec, text_encoder, device: torch.device) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        # A shape-only twin on the training device: counting never touches the (wrapped, sharded) trained model.
        # ("cpu:0", which accelerate reports for CPU ranks, and "cpu" must not count as two devices)
        with FakeTensorMode(), torch.device("cpu" if device.type == "cpu" else device):
            self.model = DiT.from_dit_config(model_cfg)
        self.codec, self.text_encoder = codec, text_encoder
        self.dit = FlopMeter(DiT.flop_parts)
        self.frozen = FlopMeter()

    def count(self, video: torch.Tensor | None, latents: torch.Tensor, captions: list[str], context, mask):
        """The DiT's forward + backward, plus the frozen encoders' forwards when they ran on `video`
        (None: the batch came from the latent cache, whose stage counted them once)."""
        key = (
            None if video is None else tuple(video.shape),
            tuple(latents.shape),
            None if context is None else tuple(context.shape),
        )
        kwargs = {} if context is None else {"context": context, "context_mask": mask}
        t = torch.zeros(latents.shape[0], device=latents.device)
        dit = self.dit.count(key, forward_backward(self.model, latents, t, **kwargs))
        if video is None:
            return dit

        def frozen() -> None:
            with torch.no_grad():
                self.codec.encode(video)
                if self.text_encoder is not None:
                    self.text_encoder(captions, pad_to_max_length=True)

        return dit + self.frozen.count(key, frozen).relabel(FROZEN)
