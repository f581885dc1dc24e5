"""The lookahead's reference computations: the faithful per-candidate loop, and the same maths batched.

Every function here returns, for each candidate, the mean over the evaluation items of
||S'_feat(u) - C_feat(u)||^2, where S' is the student after `steps` SGD steps on that candidate
alone with loss ||S_feat(x) - C_feat(x)||^2. The student is scored in eval mode, so batch-norm
statistics never mix candidates. Lower distance = a better lesson.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


@dataclass
class StepRule:
    """The student's SGD on one candidate (PyTorch's SGD: buffer = momentum * buffer + grad)."""

    lr: float  # SGD step size
    momentum: float = 0.0  # SGD momentum (0 = plain SGD)
    steps: int = 2  # SGD steps on the one candidate


def trainable_parameters(student: nn.Module, last_layer: bool) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs the lookahead updates: the feature layer only, or the whole embedding.

    The classifier head (`fc_out`) never takes part in `embed`, so it is left out.
    """
    if last_layer:
        prefix = next(name for name, module in student.named_modules() if module is student.feature_layer)
        return [(f"{prefix}.{name}", p) for name, p in student.feature_layer.named_parameters()]
    return [(name, p) for name, p in student.named_parameters() if not name.startswith("fc_out.")]


@torch.inference_mode()
def _mean_distance(embed, eval_images: torch.Tensor, eval_targets: torch.Tensor, batch_size: int,
                   squared: bool = True) -> float:
    total = 0.0
    for start in range(0, len(eval_images), batch_size):
        features = embed(eval_images[start:start + batch_size])
        total += float(item_distances(features, eval_targets[start:start + batch_size], squared).sum())
    return total / len(eval_images)


def item_distances(features: torch.Tensor, targets: torch.Tensor, squared: bool = True) -> torch.Tensor:
    """(..., D), (..., D) -> (...,): ||f - t||^2 per item (distance=squared), or ||f - t|| (distance=l2)."""
    gaps = (features - targets).pow(2).sum(-1)
    return gaps if squared else gaps.sqrt()


def exact_distances(student: nn.Module, candidate_images: torch.Tensor, candidate_targets: torch.Tensor,
                    eval_images: torch.Tensor, eval_targets: torch.Tensor, rule: StepRule,
                    last_layer: bool = False, batch_size: int = 2048, squared: bool = True) -> torch.Tensor:
    """(Nc,) distances by the faithful loop: reset the student, step on one candidate, evaluate.

    Slow by design (one pass over the evaluation images per candidate): it is the yardstick.
    """
    student.eval()
    params = [p for _, p in trainable_parameters(student, last_layer)]
    originals = [p.detach().clone() for p in params]
    distances = torch.empty(len(candidate_images), dtype=torch.float64)
    try:
        for position in range(len(candidate_images)):
            with torch.no_grad():
                for p, original in zip(params, originals):
                    p.copy_(original)
            optimizer = torch.optim.SGD(params, lr=rule.lr, momentum=rule.momentum)
            image, target = candidate_images[position:position + 1], candidate_targets[position:position + 1]
            for _ in range(rule.steps):
                loss = (student.embed(image) - target).pow(2).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            distances[position] = _mean_distance(student.embed, eval_images, eval_targets, batch_size, squared)
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)
        for p in params:
            p.grad = None
    return distances


def exact_last_layer_distances(weight: torch.Tensor, bias: torch.Tensor, candidate_inputs: torch.Tensor,
                               candidate_targets: torch.Tensor, eval_inputs: torch.Tensor,
                               eval_targets: torch.Tensor, rule: StepRule, squared: bool = True) -> torch.Tensor:
    """(Nc,) distances by the faithful loop when only the feature layer learns.

    The frozen trunk's outputs (`*_inputs`, (N, d_in)) are computed once, which changes nothing
    in the maths; each candidate still gets its own autograd SGD on a fresh copy of the layer.
    """
    distances = torch.empty(len(candidate_inputs), dtype=torch.float64)
    for position in range(len(candidate_inputs)):
        w = weight.detach().clone().requires_grad_(True)
        b = bias.detach().clone().requires_grad_(True)
        optimizer = torch.optim.SGD([w, b], lr=rule.lr, momentum=rule.momentum)
        inputs, target = candidate_inputs[position:position + 1], candidate_targets[position:position + 1]
        for _ in range(rule.steps):
            loss = (torch.relu(inputs @ w.T + b) - target).pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.inference_mode():
            features = torch.relu(eval_inputs @ w.T + b)  # (Ne, D)
            distances[position] = float(item_distances(features, eval_targets, squared).mean())
    return distances


class _EmbedView(nn.Module):
    """`forward` = the network's `embed`, so torch.func.functional_call can drive it."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images):
        return self.network.embed(images)


def batched_distances(student: nn.Module, candidate_images: torch.Tensor, candidate_targets: torch.Tensor,
                      eval_images: torch.Tensor, eval_targets: torch.Tensor, rule: StepRule,
                      last_layer: bool = False, chunk_size: int = 16, eval_chunk: int = 512,
                      squared: bool = True) -> torch.Tensor:
    """(Nc,) distances, the same maths as `exact_distances` for `chunk_size` candidates at once.

    torch.func: `grad` of the one-candidate loss, the SGD steps written out per candidate, `vmap`
    over candidates, then the updated students are evaluated together on chunks of the evaluation
    images. Pays on a GPU; on a CPU the floor stays one forward pass over the evaluation split per
    candidate.
    """
    student.eval()
    view = _EmbedView(student)
    names = {f"network.{name}" for name, _ in trainable_parameters(student, last_layer)}
    params = {name: p.detach() for name, p in view.named_parameters() if name in names}

    def embed_with(parameters, images):
        return functional_call(view, parameters, (images,))

    def candidate_loss(parameters, image, target):
        return (embed_with(parameters, image[None]) - target[None]).pow(2).sum()

    def learn_one(parameters, image, target):
        buffer = None
        for _ in range(rule.steps):
            gradient = grad(candidate_loss)(parameters, image, target)
            if buffer is None:
                buffer = gradient
            else:
                buffer = {k: rule.momentum * buffer[k] + gradient[k] for k in gradient}
            parameters = {k: parameters[k] - rule.lr * buffer[k] for k in parameters}
        return parameters

    def eval_sum(parameters, images, targets):
        return item_distances(embed_with(parameters, images), targets, squared).sum()

    learn_many = vmap(learn_one, in_dims=(None, 0, 0))
    eval_many = vmap(eval_sum, in_dims=(0, None, None))
    distances = torch.empty(len(candidate_images), dtype=torch.float64)
    for start in range(0, len(candidate_images), chunk_size):
        stop = min(start + chunk_size, len(candidate_images))
        updated = learn_many(params, candidate_images[start:stop], candidate_targets[start:stop])
        updated = {k: v.detach() for k, v in updated.items()}
        total = torch.zeros(stop - start, dtype=torch.float64, device=candidate_images.device)
        with torch.inference_mode():
            for eval_start in range(0, len(eval_images), eval_chunk):
                total += eval_many(updated, eval_images[eval_start:eval_start + eval_chunk],
                                   eval_targets[eval_start:eval_start + eval_chunk]).double()
        distances[start:stop] = (total / len(eval_images)).cpu()
    return distances
