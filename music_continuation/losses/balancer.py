"""Per-component gradients at the decoder's output audio: always measured, optionally balanced.

A loss's value says nothing about its pull on the model; its gradient does. Every training step takes, for
each trained component i (weight > 0), its gradient at the output audio y on the loss graph only (from the
losses back to y, never through the decoder or the model):

    g_i = dl_i/dy           (torch.autograd.grad on a detached copy of y that requires grad)
    n_i = mean over the examples b of ||g_i[b]||_2 x B          (B: examples in the micro-batch)

The factor B makes n_i the norm of the gradient of ONE example's loss (the losses are means over the batch,
so each row of g_i is 1/B of it): a figure that does not depend on the batch size or the number of ranks.
(Spectral convergence is a ratio over the batch, so for it this is approximate, as its value is.)

The gradient applied at y is then the sum sum_i s_i g_i, backpropagated into the decoder and the model in
ONE y.backward per micro-batch, so DDP sees exactly one parameter backward, as before. The scale s_i is

    without the balancer  s_i = w_i                                   (the plain weighted sum)
    with the balancer     s_i = (w_i / sum_j w_j) x R / (eps + avg(n_i)),   R = 1, eps = 1e-12

which is the loss balancer of EnCodec and AudioCraft (`audiocraft/losses/balancer.py`, Defossez et al.,
"High Fidelity Neural Audio Compression", 2022):

    G = sum_i R x g_i / avg(||g_i||) x w_i / sum_j w_j

avg is a bias-corrected exponential moving average with decay beta (--balancer_ema_decay), as
flashy.averager: A_t = beta A_{t-1} + m_t, C_t = beta C_{t-1} + 1, avg = A_t / C_t, where m_t is the step's
n_i averaged over every example of every rank (sums and counts all-reduced, not a mean of means). A weight
then means the fraction of the gradient at y that its component drives, whatever the component's scale.

The figures logged per epoch (train_grad_norm_<component>, train_grad_share_<component>) are

    grad_norm_i   = the mean over examples of n_i (unweighted)
    grad_share_i  = the mean over micro-batches of  s_i n_i / sum_j s_j n_j    (they sum to 1)

With --grad_accum_steps K the moving average advances once per optimiser step, with the norms of all K
micro-batches of every rank. Micro-batch k of the step is scaled by the average as it would be if the step
had only micro-batches 1..k (their running mean stands in for m_t); the last one uses the step's own m_t, the
value committed to the average. So K = 1 is exactly AudioCraft's per-batch update, and accumulation differs
from one larger batch only through the earlier micro-batches' provisional m_t (whose weight in the average
is (1 - beta) / (1 - beta^t): everything at the first step, 0.1 % once the average has settled).

The average is committed only when the step is applied: a non-finite g_i on any rank makes the reduced norms
non-finite on every rank, the step is skipped on every rank together (worker.optimizer_update)
and the average stays as it was.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

EPSILON = 1e-12          # AudioCraft's epsilon: only guards a zero norm
REFERENCE_NORM = 1.0     # R: the norm the balanced per-example gradient at y is given


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class LossBalancer:
    """The gradient at y for a micro-batch's trained losses, and the figures of the step (module docstring).

    weights: {component: weight}; only those > 0 are trained (weight-0 ones are measured-only losses with no
    graph, and never come here). balance: apply the balancer (else s_i = w_i: measurement only). With
    balance, every rank must call `gradient` for every micro-batch in the same order: it all-reduces.
    Per optimiser step: start_step(), gradient() per micro-batch, end_step(applied).
    """

    def __init__(self, weights: dict, balance: bool = False, ema_decay: float = 0.999):
        self.names = [name for name, weight in weights.items() if weight > 0]
        if not self.names:
            raise ValueError("LossBalancer: no component has a positive weight")
        self.weights = {name: float(weights[name]) for name in self.names}
        self.balance, self.ema_decay = bool(balance), float(ema_decay)
        self.ema_sum: torch.Tensor | None = None       # A_t per trained component (float64)
        self.ema_count: torch.Tensor | None = None     # C_t (float64 scalar)
        self.start_step()

    # ---------------------------------------------------------------------------------- per step

    def start_step(self) -> None:
        """Forget the previous step's figures and provisional norms (before the step's first micro-batch)."""
        self._step_norms = None   # balance: [K + 1] sums over every rank's examples of the step so far, count
        self.finite = None        # balance: bool tensor, False if a reduced norm of this step was non-finite
        self.figures = None       # this rank's step figures: [norm sums (K), examples, share sums (K), batches]

    def gradient(self, losses: dict, y: torch.Tensor, held: tuple = ()) -> torch.Tensor:
        """sum_i s_i dl_i/dy for the micro-batch's trained losses {name: scalar with a graph to the leaf y}.

        held: components measured but not applied in this step (the adversarial terms during
        --adversarial_start_step): their s_i is 0, while their norms still enter the average, so it has
        settled by the time they start.
        """
        grads = []
        for index, name in enumerate(self.names):    # the loss graph only: y is a leaf
            grad, = torch.autograd.grad(losses[name], y, retain_graph=index < len(self.names) - 1)
            grads.append(grad)
        size = y.shape[0]
        # n_i: the mean per-example norm of one example's loss gradient (rows of g_i are 1/size of it)
        norms = torch.stack([grad.flatten(1).norm(dim=1).mean() for grad in grads]).double() * size
        scales = self._scales(norms, size)
        if held:
            scales = scales * self._mask(held, scales.device)
        applied = scales * norms
        self._add_figures(norms * size, size, applied / applied.sum())
        gradient = torch.zeros_like(y)
        for grad, scale in zip(grads, scales.to(y.dtype)):
            gradient.add_(grad * scale)
        return gradient

    def _mask(self, held: tuple, device) -> torch.Tensor:
        """1 for the components applied in this step, 0 for those held back."""
        return torch.tensor([0.0 if name in held else 1.0 for name in self.names], dtype=torch.float64,
                            device=device)

    def _constants(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_i, w_i / sum w) as float64 tensors on the device, made once (no host-to-device copy per step)."""
        if getattr(self, "_constants_on", (None,))[0] != device:
            total_weight = sum(self.weights.values())
            weights = torch.tensor([self.weights[name] for name in self.names], dtype=torch.float64, device=device)
            self._constants_on = (device, weights, weights / total_weight)
        return self._constants_on[1:]

    def _scales(self, norms: torch.Tensor, size: int) -> torch.Tensor:
        """s_i: the weights, or the balancer's scales from the average including this step's norms so far."""
        weights, ratios = self._constants(norms.device)
        if not self.balance:
            return weights
        local = torch.cat([norms * size, norms.new_full((1,), float(size))])
        reduced = _all_reduce_sum(local)      # every rank, every micro-batch, in the same order
        self._step_norms = reduced if self._step_norms is None else self._step_norms + reduced
        step_mean = self._step_norms[:-1] / self._step_norms[-1]
        finite = torch.isfinite(step_mean).all()
        self.finite = finite if self.finite is None else self.finite & finite
        return ratios * REFERENCE_NORM / (EPSILON + self._average_with(step_mean))

    def _average_with(self, step_mean: torch.Tensor) -> torch.Tensor:
        """The bias-corrected average after one more update with step_mean (the state is not changed)."""
        if self.ema_sum is None:
            return step_mean
        return (self.ema_decay * self.ema_sum + step_mean) / (self.ema_decay * self.ema_count + 1.0)

    def _add_figures(self, norm_sums: torch.Tensor, size: int, shares: torch.Tensor) -> None:
        one = torch.ones(1, dtype=torch.float64, device=norm_sums.device)
        figures = torch.cat([norm_sums, one * size, shares, one])
        self.figures = figures if self.figures is None else self.figures + figures

    def end_step(self, applied: bool) -> None:
        """Commit the step's norms to the average if the step was applied (a decision shared by every rank)."""
        step_norms, self._step_norms = self._step_norms, None
        if not (self.balance and applied and step_norms is not None):
            return
        step_mean = step_norms[:-1] / step_norms[-1]
        if self.ema_sum is None:
            self.ema_sum = step_mean.clone()
            self.ema_count = torch.ones((), dtype=torch.float64, device=step_mean.device)
        else:
            self.ema_sum = self.ema_decay * self.ema_sum + step_mean
            self.ema_count = self.ema_decay * self.ema_count + 1.0

    # ---------------------------------------------------------------------------------- figures

    def epoch_figures(self, sums: torch.Tensor) -> dict:
        """{grad_norm_<name>, grad_share_<name>} from the sum of the applied steps' `figures` over every rank."""
        count = len(self.names)
        sums = sums.double().cpu()
        examples, batches = sums[count].item(), sums[2 * count + 1].item()
        if not examples or not batches:
            return {}
        figures = {}
        for index, name in enumerate(self.names):
            figures[f"grad_norm_{name}"] = sums[index].item() / examples
            figures[f"grad_share_{name}"] = sums[count + 1 + index].item() / batches
        return figures

    def figure_size(self) -> int:
        return 2 * len(self.names) + 2

    # ---------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """What a checkpoint keeps (None: the balancer is off, or no step has been applied yet)."""
        if not self.balance:
            return None
        return {"components": list(self.names), "ema_decay": self.ema_decay,
                "ema_sum": None if self.ema_sum is None else self.ema_sum.cpu(),
                "ema_count": None if self.ema_count is None else self.ema_count.cpu()}

    def load_state_dict(self, state: dict | None, device=None) -> None:
        if state is None:
            return
        if list(state["components"]) != self.names:
            raise ValueError(f"balancer state of components {state['components']}, this run trains {self.names}")
        self.ema_sum = None if state["ema_sum"] is None else state["ema_sum"].to(device)
        self.ema_count = None if state["ema_count"] is None else state["ema_count"].to(device)
