"""`full-fast`: the whole-network lookahead for every candidate without a pass over the evaluation split each.

What is exact: each candidate's own `steps` SGD steps on the whole network (torch.func: vmap of
grad over chunks of candidates), giving its parameter change: dW~ for the feature layer and
dtheta for the trunk (every layer before it).

What is approximated, on the evaluation items only (u):
- the feature layer's change acts through the rank-one dW~ ~ -a_c h~_c^T, with a_c = -dW~ h~_c / ||h~_c||^2
  (exact when the trunk is frozen; the second step's input differs from h~_c by the trunk's small change);
- the trunk's change moves each evaluation input by J_u dtheta (first order), with dtheta projected
  on the `rank` principal directions Q of the candidates' trunk changes: dh_u ~ (J_u Q) (Q^T dtheta);
- the evaluation items' ReLU pattern is held fixed, so, with dz_u = -k_cu a_c + B_u alpha_c,
  B_u = W J_u Q (D, R), alpha_c = Q^T dtheta_c (R,), k_cu = h~_c . h~_u, the mean squared distance is a
  quadratic in (a_c, alpha_c) whose coefficients are a few matrix products over all candidates.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap

# torch's own forward-mode decompositions are still compiled with torch.jit.script, which warns
# (FutureWarning) the first time jvp runs; the warning is about torch's internals, not this code.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
    try:
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    except ImportError:  # a torch without that module has nothing to warn about
        pass

from .. import seeding
from ..seeding import Stream
from ..train import embed_pool
from .lookahead_exact import StepRule, _EmbedView, trainable_parameters
from .lookahead_round import last_layer_problem, pool_images, trunk_outputs


def candidate_updates(student, candidate_images: torch.Tensor, candidate_targets: torch.Tensor, rule: StepRule,
                      chunk_size: int = 64):
    """Each candidate's exact parameter change after `rule`'s steps on it alone.

    Returns (feature-layer change (Nc, D, d + 1), trunk change (Nc, P_trunk) flattened, trunk names).
    """
    view = _EmbedView(student)
    names = [f"network.{name}" for name, _ in trainable_parameters(student, last_layer=False)]
    layer = {f"network.{name}" for name, _ in trainable_parameters(student, last_layer=True)}
    params = {name: p.detach() for name, p in view.named_parameters() if name in set(names)}
    trunk_names = [name for name in names if name not in layer]
    weight_name = next(name for name in layer if name.endswith("weight"))
    bias_name = next(name for name in layer if name.endswith("bias"))

    def loss(parameters, image, target):
        return (functional_call(view, parameters, (image[None],)) - target[None]).pow(2).sum()

    def change(parameters, image, target):
        buffer, current = None, parameters
        for _ in range(rule.steps):
            gradient = grad(loss)(current, image, target)
            buffer = gradient if buffer is None else {k: rule.momentum * buffer[k] + gradient[k] for k in gradient}
            current = {k: current[k] - rule.lr * buffer[k] for k in current}
        return {k: current[k] - parameters[k] for k in parameters}

    many = vmap(change, in_dims=(None, 0, 0))
    layer_changes, trunk_changes = [], []
    for start in range(0, len(candidate_images), chunk_size):
        delta = many(params, candidate_images[start:start + chunk_size], candidate_targets[start:start + chunk_size])
        layer_changes.append(torch.cat([delta[weight_name], delta[bias_name][:, :, None]], dim=2).detach())
        trunk_changes.append(torch.cat([delta[name].flatten(1) for name in trunk_names], dim=1).detach())
    return torch.cat(layer_changes), torch.cat(trunk_changes), trunk_names


def principal_directions(changes: torch.Tensor, rank: int) -> torch.Tensor:
    """(P, R) orthonormal directions that carry most of the rows' energy (uncentred, as a projection)."""
    rank = min(rank, *changes.shape)
    if rank <= 0:
        return changes.new_zeros(changes.shape[1], 0)
    _, _, vh = torch.linalg.svd(changes, full_matrices=False)
    return vh[:rank].T.contiguous()


def trunk_jacobian_products(student, eval_images: torch.Tensor, directions: torch.Tensor, trunk_names: list[str],
                            chunk_size: int = 256) -> torch.Tensor:
    """(Ne, d_in, R): how each evaluation input moves along each direction of the trunk's parameters (JVPs)."""
    view = _EmbedView(student)
    shapes = {name: p.shape for name, p in view.named_parameters()}
    params = {name: p.detach() for name, p in view.named_parameters() if name in set(trunk_names)}

    tangents = dict(zip(trunk_names, _split_columns(directions, trunk_names, shapes)))  # each (R, *shape)
    out = []
    for start in range(0, len(eval_images), chunk_size):
        images = eval_images[start:start + chunk_size]

        def along(tangent):
            return jvp(lambda p: _trunk_call(view, p, images), (params,), (tangent,))[1]

        out.append(vmap(along, out_dims=2)(tangents))  # (c, d_in, R): all directions in one vectorised pass
    return torch.cat(out)


def _split_columns(directions: torch.Tensor, names: list[str], shapes: dict) -> list[torch.Tensor]:
    """(P, R) -> per parameter (R, *shape): the R directions, cut along the flattened trunk parameters."""
    out, offset = [], 0
    for name in names:
        size = int(np.prod(shapes[name]))
        out.append(directions[offset:offset + size].T.reshape(directions.shape[1], *shapes[name]))
        offset += size
    return out


class _TrunkView(torch.nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, images):
        return self.network.features_before_feature_layer(images)


def _trunk_call(view, parameters, images):
    return functional_call(_TrunkView(view.network), parameters, (images,))


def full_fast_distances_from(candidate_inputs: torch.Tensor, a: torch.Tensor, alpha: torch.Tensor,
                             eval_inputs: torch.Tensor, eval_z: torch.Tensor, eval_targets: torch.Tensor,
                             eval_moves: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """(Nc,) approximate distances (module docstring).

    candidate_inputs: (Nc, d + 1) h~_c; a: (Nc, D) the feature layer's rank-one coefficients;
    alpha: (Nc, R) the trunk change in the directions Q; eval_*: (Ne, d + 1), (Ne, D), (Ne, D);
    eval_moves: (Ne, D, R) B_u = W J_u Q.
    """
    count = len(eval_inputs)
    pattern = (eval_z > 0).to(eval_z.dtype)  # (Ne, D)
    residual = torch.relu(eval_z) - eval_targets  # (Ne, D)
    weighted = pattern * residual
    baseline = residual.double().pow(2).sum(1).mean()
    rank = eval_moves.shape[2]
    projected = eval_inputs.T @ weighted  # (d + 1, D)
    b = torch.einsum("udr,ud->r", eval_moves, weighted)  # (R,)
    gram = torch.einsum("udr,uds,ud->rs", eval_moves, eval_moves, pattern)  # (R, R)
    masked_moves = (pattern[:, :, None] * eval_moves).reshape(count, -1)  # (Ne, D*R)
    linear = -((candidate_inputs @ projected) * a).sum(1) + alpha @ b  # (Nc,)
    quadratic = torch.empty(len(candidate_inputs), dtype=eval_z.dtype, device=eval_z.device)
    for start in range(0, len(candidate_inputs), chunk_size):
        stop = start + chunk_size
        kernel = candidate_inputs[start:stop] @ eval_inputs.T  # (c, Ne)
        own = ((kernel * kernel) @ pattern * a[start:stop].pow(2)).sum(1)
        cross = ((kernel @ masked_moves).view(-1, eval_z.shape[1], rank) * a[start:stop, :, None]
                 * alpha[start:stop, None, :]).sum((1, 2)) if rank else 0.0
        trunk = ((alpha[start:stop] @ gram) * alpha[start:stop]).sum(1) if rank else 0.0
        quadratic[start:stop] = own - 2.0 * cross + trunk
    return (baseline + (2.0 * linear.double() + quadratic.double()) / count).cpu()


def full_fast_distances(state, round_, indices: np.ndarray, options) -> np.ndarray:
    """The `full-fast` mode's distances for pool `indices` (lower = better)."""
    problem = last_layer_problem(state, round_)
    student = round_.student
    batch = state.train_config.eval_batch_size
    if "full_directions" not in round_.cache:
        # Principal directions from a seeded sample of the candidates' trunk changes, shared by every shard.
        rng = seeding.rng(state.seed, state.round_index, Stream.TRUNK_DIRECTIONS)
        sample = np.sort(rng.choice(len(round_.candidates), size=min(512, len(round_.candidates)), replace=False))
        sample_indices = round_.candidates[sample]
        sample_images = pool_images(state, sample_indices).clone()
        sample_targets = embed_pool(state.model, state.dataset, sample_indices, state.device, batch).clone()
        _, sample_trunk, trunk_names = candidate_updates(student, sample_images, sample_targets, round_.rule,
                                                         options.chunk_size * 16)
        directions = principal_directions(sample_trunk, options.trunk_rank)
        weight = problem["weight"][:, :-1]  # (D, d_in)
        if directions.shape[1]:
            eval_images = pool_images(state, round_.evaluation).clone()
            jacobian = trunk_jacobian_products(student, eval_images, directions, trunk_names)  # (Ne, d_in, R)
            moves = torch.einsum("dh,uhr->udr", weight, jacobian)
        else:
            moves = weight.new_zeros(len(round_.evaluation), weight.shape[0], 0)
        round_.cache["full_directions"] = directions
        round_.cache["full_moves"] = moves
    directions = round_.cache["full_directions"]
    inputs = trunk_outputs(student, state, indices)  # (Nc, d + 1)
    coefficients, alphas = [], []
    for start in range(0, len(indices), batch):  # keep only (a_c, alpha_c), never the whole changes
        part = indices[start:start + batch]
        images = pool_images(state, part).clone()
        targets = embed_pool(state.model, state.dataset, part, state.device, batch).clone()
        layer_change, trunk_change, _ = candidate_updates(student, images, targets, round_.rule, options.chunk_size * 16)
        own = inputs[start:start + batch]
        coefficients.append(-(layer_change @ own[:, :, None]).squeeze(2) / own.pow(2).sum(1)[:, None])
        alphas.append(trunk_change @ directions)
    return full_fast_distances_from(inputs, torch.cat(coefficients), torch.cat(alphas), problem["eval_inputs"],
                                    problem["eval_z"], round_.eval_targets, round_.cache["full_moves"]).numpy()
