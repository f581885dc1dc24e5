"""Adversarial margin sampling (Ducoffe and Precioso, 2018): query the images closest to the decision boundary,
the distance estimated by the size of the smallest perturbation that flips the predicted class.

Both attacks run on a whole batch of images at once on `state.device`; an image leaves the batch as
soon as its label flips, and every attack stops after `max_iter` steps. The score is minus the L2 norm
of the flipping perturbation (in normalised input units), so the nearest images come first. An image
that the attack never flips within `max_iter` steps scores `UNFLIPPED_SCORE`: it ranks after every
flipped image (it is at least as far as the attack could reach), ties broken by pool position.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..train import image_batches
from . import register_strategy
from .base import QueryState, Strategy

UNFLIPPED_SCORE = -1e9  # score of an image no step flipped: after every flipped image, and still valid JSON


@dataclass
class AttackResult:
    distance: torch.Tensor  # (B,) L2 norm of the flipping perturbation; NaN where the label never flipped
    steps: torch.Tensor  # (B,) attack steps taken


def bim_attack(model, images: torch.Tensor, step_size: float, max_iter: int) -> AttackResult:
    """Basic iterative method: x += step_size * sign(grad of the loss of the predicted class) until it flips."""
    count = images.shape[0]
    perturbation = torch.zeros_like(images)
    distance = torch.full((count,), float("nan"), device=images.device)
    steps = torch.zeros(count, dtype=torch.long, device=images.device)
    original = None  # the predicted class, read off step 0's forward pass (the perturbation is still zero)
    active = torch.arange(count, device=images.device)
    for step in range(max_iter + 1):
        inputs = (images[active] + perturbation[active]).requires_grad_(True)
        with torch.enable_grad():
            logits = model(inputs)
            if original is None:
                original = logits.detach().argmax(dim=1)
            same = logits.argmax(dim=1) == original[active]
            flipped = active[~same]
            distance[flipped] = perturbation[flipped].flatten(1).norm(dim=1)
            active = active[same]
            if step == max_iter or len(active) == 0:
                break
            loss = F.cross_entropy(logits[same], original[active], reduction="sum")  # sum: per-image gradients
            gradient, = torch.autograd.grad(loss, inputs)
        perturbation[active] += step_size * gradient[same].sign()
        steps[active] += 1
    return AttackResult(distance, steps)


def _gap_gradients(logits: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
                   classes: torch.Tensor) -> torch.Tensor:
    """(B, M, P) gradients of logits[b, classes[b, m]] - logits[b, labels[b]] with respect to image b.

    One vectorised backward pass for all M differences (images are independent in eval mode).
    """
    count, chosen = classes.shape
    grad_outputs = torch.zeros(chosen, count, logits.shape[1], device=logits.device, dtype=logits.dtype)
    grad_outputs.scatter_(2, classes.T.unsqueeze(2), 1.0)  # (M, B, C): +1 at class m of each image
    grad_outputs.scatter_(2, labels.view(1, count, 1).expand(chosen, count, 1), -1.0)  # -1 at its label
    try:
        gradients, = torch.autograd.grad(logits, inputs, grad_outputs, is_grads_batched=True)
    except RuntimeError:  # an operation without a batching rule: one backward pass per class
        gradients = torch.stack([torch.autograd.grad(logits, inputs, grad_outputs[m], retain_graph=True)[0]
                                 for m in range(chosen)])
    return gradients.flatten(2).transpose(0, 1)  # (B, M, P)


def deepfool_attack(model, images: torch.Tensor, overshoot: float, max_iter: int,
                    candidate_classes: int = 0) -> AttackResult:
    """Multi-class DeepFool (Moosavi-Dezfooli et al., 2016), batched.

    Each step linearises the classifier at the current point, moves to the nearest linearised boundary
    r = (|f_l| + 1e-4) / |w_l|^2 * w_l, l = argmin_k |f_k| / |w_k| (f_k, w_k: logit and gradient differences
    to the original class), accumulates r, and evaluates x + (1 + overshoot) * r_total.
    `candidate_classes` > 0 considers only that many most likely other classes at each step (as the
    original implementation does for ImageNet); 0 considers every class.
    """
    count = images.shape[0]
    total = torch.zeros_like(images)  # r_total, the accumulated steps
    distance = torch.full((count,), float("nan"), device=images.device)
    steps = torch.zeros(count, dtype=torch.long, device=images.device)
    original = None  # the predicted class, read off step 0's forward pass (r_total is still zero)
    active = torch.arange(count, device=images.device)
    for step in range(max_iter + 1):
        inputs = (images[active] + (1 + overshoot) * total[active]).requires_grad_(True)
        with torch.enable_grad():
            logits = model(inputs)  # (B, C)
            if original is None:
                original = logits.detach().argmax(dim=1)
            same = logits.argmax(dim=1) == original[active]
            flipped = active[~same]
            distance[flipped] = ((1 + overshoot) * total[flipped]).flatten(1).norm(dim=1)
            if step == max_iter or not same.any():
                break
            labels = original[active]
            others = logits.detach().scatter(1, labels.unsqueeze(1), float("-inf"))
            shortlist = logits.shape[1] - 1 if candidate_classes <= 0 else min(candidate_classes, logits.shape[1] - 1)
            classes = others.topk(shortlist, dim=1).indices  # (B, M) the other classes, likeliest first
            gradient_gap = _gap_gradients(logits, inputs, labels, classes)  # (B, M, P): w_k
        with torch.no_grad():
            keep = same.nonzero().flatten()
            gradient_gap, classes, labels = gradient_gap[keep], classes[keep], labels[keep]
            kept_logits = logits.detach()[keep]
            logit_gap = kept_logits.gather(1, classes) - kept_logits.gather(1, labels.unsqueeze(1))  # (B', M): f_k
            ratio = logit_gap.abs() / gradient_gap.norm(dim=2).clamp_min(1e-12)
            nearest_class = ratio.argmin(dim=1)
            rows = torch.arange(len(keep), device=images.device)
            f_l = logit_gap[rows, nearest_class].abs()
            w_l = gradient_gap[rows, nearest_class]  # (B', P)
            step_vector = ((f_l + 1e-4) / w_l.pow(2).sum(1).clamp_min(1e-12)).unsqueeze(1) * w_l
            active = active[keep]
            total[active] += step_vector.view_as(total[active])
            steps[active] += 1
    return AttackResult(distance, steps)


@dataclass
class BIMOptions:
    step_size: float = 0.05  # per-pixel step, in normalised input units (the reference's eps)
    max_iter: int = 50  # steps at most; an image still unflipped then scores UNFLIPPED_SCORE
    batch_size: int = 1024  # images attacked together

    def validate(self) -> None:
        if self.step_size <= 0 or self.max_iter < 1 or self.batch_size < 1:
            raise ConfigError("adversarial-bim needs step_size > 0, max_iter >= 1 and batch_size >= 1")


@dataclass
class DeepFoolOptions:
    overshoot: float = 0.02  # push past the linearised boundary by this fraction of the perturbation
    max_iter: int = 50  # steps at most; an image still unflipped then scores UNFLIPPED_SCORE
    batch_size: int = 256  # images attacked together (the Jacobian holds C x batch x pixels floats)
    candidate_classes: int = 0  # other classes considered per step, the most likely first; 0 = all

    def validate(self) -> None:
        if self.overshoot < 0 or self.max_iter < 1 or self.batch_size < 1 or self.candidate_classes < 0:
            raise ConfigError("adversarial-deepfool needs overshoot >= 0, max_iter >= 1 and batch_size >= 1")


def attack_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen eval-mode copy of the classifier for attacking: dropout off, no weight gradients, and
    channels-last memory on image models, where the backward pass to the image (the attacks' main
    cost) runs about 1.5x faster on a CPU. A copy, so the trained model itself is left as it was.
    """
    attacked = copy.deepcopy(model).eval().requires_grad_(False)
    return attacked.to(memory_format=torch.channels_last)


class AdversarialStrategy(Strategy):
    def attack(self, model, images: torch.Tensor) -> AttackResult:
        raise NotImplementedError

    def score(self, state: QueryState) -> np.ndarray:
        model = attack_copy(state.model)
        distances = []
        for images in image_batches(state.dataset, state.unlabeled_indices, self.options.batch_size, state.device):
            if images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            distances.append(self.attack(model, images).distance.double().cpu().numpy())
        distance = np.concatenate(distances) if distances else np.empty(0)
        return np.where(np.isnan(distance), UNFLIPPED_SCORE, -distance)


@register_strategy
class AdversarialBIM(AdversarialStrategy):
    name = "adversarial-bim"
    help = "smallest iterative sign-gradient (BIM) perturbation that flips the prediction"
    Options = BIMOptions

    def attack(self, model, images):
        return bim_attack(model, images, self.options.step_size, self.options.max_iter)


@register_strategy
class AdversarialDeepFool(AdversarialStrategy):
    name = "adversarial-deepfool"
    help = "smallest DeepFool perturbation (with overshoot) that flips the prediction"
    Options = DeepFoolOptions

    def attack(self, model, images):
        return deepfool_attack(model, images, self.options.overshoot, self.options.max_iter,
                               self.options.candidate_classes)
