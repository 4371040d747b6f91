"""The jitted train and eval steps.

State (a plain dict, checkpointed as is):
    step     int32 []       optimizer steps taken
    params   pytree         the trained parameters (all of them, or the LoRA factors)
    opt_state               optax state of `params` only
    rng      uint32 [2]     base key; step s uses fold_in(rng, s)
    skipped  int32 []       updates dropped because the loss / gradient was not finite (train.on_nan=skip)

`frozen` is a second, non-donated argument: the base parameters in LoRA / P-tuning mode, {} otherwise.

Loss: logits in float32, nll = logsumexp(logits) - logit[target], optional z-loss z * logsumexp^2, summed over
target tokens and divided by the number of target tokens in the whole global batch. Microbatches (grad_accum)
are scanned inside the step and their gradients summed, so the update equals the one of a single big batch.

MoE models (docs/training.md, "MoE models"): the forward pass sows every router's tokens per expert and
sequence-wise balance terms (layers/moe.py, load_stats). The step adds train.moe_balance_loss * (mean over the
batch's sequences of the summed balance terms), then, after the optimizer update, moves every router's
e_score_correction_bias by rate * sign(mean load - load) (auxiliary-loss-free balancing; the optimizer leaves
the bias alone), and reports per-layer min / max / coefficient of variation of the load.

MTP layers (docs/mtp.md): with mtp_loss_weight > 0 the objective adds weight * (the MTP layers' nll, averaged over
the depths, over the same token count as the main loss: DeepSeek-V3's lambda / D * sum of the depth losses), and
the step reports mtp_loss and mtp_accuracy (next-next-token argmax hits) over the MTP layers' own targets.
"""

from __future__ import annotations

from typing import Any, Callable

import re

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from glm_jax.model import MTPHead, output_head
from glm_jax.model.layers.pooling import pool
from glm_jax.sharding import axis_rules
from glm_jax.train import lora as lora_lib

ACCURACY_TASKS = ("classification", "embedding", "cloze")  # tasks whose steps also count correct answers
BATCH_AXES = ("data", "fsdp", "expert")  # the expert axis is also data parallel outside the experts (sharding.py)

# The L2 norm over every leaf: optax.tree.norm, which deprecates optax.global_norm (older optax has only the latter).
tree_l2_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def batch_spec(name: str, ndim: int, microbatched: bool) -> P:
    lead = (None,) if microbatched else ()
    body = (BATCH_AXES, "sequence") if ndim - len(lead) == 2 else (BATCH_AXES,)
    return P(*lead, *body)


def batch_shardings(mesh, example: dict, microbatched: bool = True) -> dict:
    return {k: NamedSharding(mesh, batch_spec(k, v.ndim, microbatched)) for k, v in example.items()}


def chunked_lm_sums(hidden, kernel, targets, mask, z_loss: float, chunk: int, dtype, with_hits: bool = False):
    """sum(nll + z) and sum(nll) over masked tokens (with_hits: and the number of argmax hits), projecting onto the
    vocabulary `chunk` positions at a time.

    The fp32 logits [batch, seq, vocab] (1 GiB for 4 x 2048 x 65024 in fp32) never exist at once: each chunk's
    logits are recomputed in the backward pass (jax.checkpoint) instead of being stored.
    """
    b, s, h = hidden.shape
    if s % chunk:
        raise ValueError(f"train.loss_chunk={chunk} must divide the sequence length {s}")
    n = s // chunk

    @jax.checkpoint
    def one(carry, xs):
        hc, tc, mc = xs
        logits = jnp.einsum("bsh,hv->bsv", hc.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
        nll, z = lm_token_losses(logits, tc, z_loss)
        mc = mc.astype(jnp.float32)
        sums = (jnp.sum((nll + z) * mc), jnp.sum(nll * mc))
        if with_hits:  # only the MTP metrics ask: the main loss's scan stays free of the argmax
            sums += (jnp.sum((jnp.argmax(logits, axis=-1) == tc) * mc),)
        return tuple(c + x for c, x in zip(carry, sums)), None

    split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    zeros = (jnp.zeros((), jnp.float32),) * (3 if with_hits else 2)
    sums, _ = jax.lax.scan(one, zeros, (split(hidden), split(targets), split(mask)))
    return sums


def mtp_targets(targets, mask, segment_ids, depth: int):
    """Targets and mask of MTP depth `depth` (0-based): position t predicts token t + depth + 2 = targets[t + depth
    + 1], trained where that target is and tokens t .. t + depth + 1 are one document (docs/mtp.md)."""
    shift = depth + 1
    pad = lambda x: jnp.pad(x[:, shift:], ((0, 0), (0, shift)))  # noqa: E731
    mask = pad(mask).astype(jnp.float32)
    if segment_ids is not None:
        mask = mask * (pad(segment_ids) == segment_ids)
    return pad(targets), mask


def label_sums(logits, labels, z_loss: float = 0.0):
    """Cross-entropy of [batch, labels] logits (fp32) against `labels`: (sum of nll + z-loss, {"loss_sum",
    "correct", "count"})."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(nll + z_loss * jnp.square(lse)), {"loss_sum": jnp.sum(nll), "correct": jnp.sum(correct),
                                                     "count": jnp.asarray(nll.shape[0], jnp.float32)}


def lm_token_losses(logits, targets, z_loss: float):
    """Per-token nll and z-loss terms in float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target_logit, z_loss * jnp.square(lse)


def distillation_kl(student_logits, teacher_logits, temperature: float = 1.0, kind: str = "forward",
                    top_k: int = 0):
    """Per token T^2 KL between the teacher's and the student's next-token distributions at temperature T (Hinton
    et al., 2015; the T^2 keeps the gradient's scale independent of T): "forward" KL(teacher || student),
    "reverse" KL(student || teacher). fp32. top_k > 0 (forward only): the teacher's distribution cut to its k
    most likely tokens and renormalised, against the student's log-probabilities of those tokens (sparse
    distillation: only k teacher logits per token are needed)."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    if top_k:
        top, index = jax.lax.top_k(teacher_logits.astype(jnp.float32) / temperature, top_k)
        t = jax.nn.log_softmax(top, axis=-1)
        s = jnp.take_along_axis(s, index, axis=-1)
    else:
        t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    p, log_p, log_q = (jnp.exp(t), t, s) if kind == "forward" else (jnp.exp(s), s, t)
    return temperature ** 2 * jnp.sum(p * (log_p - log_q), axis=-1)


def hidden_mse(student_hidden, teacher_hidden):
    """Per token mean over channels of the squared difference of the final (normed) hidden states, fp32."""
    diff = student_hidden.astype(jnp.float32) - teacher_hidden.astype(jnp.float32)
    return jnp.mean(diff * diff, axis=-1)


class StepBuilder:
    """Builds `train_step(state, frozen, batch) -> (state, metrics)` and `eval_step(state, frozen, batch)`.

    task: "lm" (pretrain / sft), "classification", "embedding" (contrastive query / passage pairs) or "cloze"
    (label words filling a [MASK], GLM's classification).
    """

    def __init__(self, model, tx: optax.GradientTransformation, schedule: Callable, task: str, z_loss: float = 0.0,
                 on_nan: str = "stop", lora: dict | None = None, ptuning: bool = False, loss_chunk: int = 0,
                 moe_bias_update_rate: float = 0.0, moe_balance_loss: float = 0.0, mtp_loss_weight: float = 0.0,
                 teacher=None, distill: dict | None = None, embedding: dict | None = None):
        self.model, self.tx, self.schedule, self.task = model, tx, schedule, task
        self.embedding = embedding  # task "embedding": {"temperature", "pooling", "negatives"}
        # distillation: the frozen teacher model (its parameters are frozen["teacher"]) and {"temperature",
        # "alpha", "kl", "top_k", "hidden_weight", "hidden_channels" (the teacher's channels matched to the
        # student's, None: all)}
        self.teacher, self.distill = teacher, distill
        self.loss_chunk = loss_chunk
        # the MTP layers' loss (docs/mtp.md): added with this weight; 0 = they are not run
        self.mtp_loss_weight = mtp_loss_weight if task == "lm" and getattr(model.cfg, "num_mtp_layers", 0) else 0.0
        self.ptuning = ptuning
        self.z_loss, self.on_nan, self.lora = z_loss, on_nan, lora
        # MoE load statistics are sown only for a model with MoE layers: a dense model's step is unchanged
        self.moe = getattr(model.cfg, "num_moe_layers", 0) > 0 and getattr(model.cfg, "n_routed_experts", 0) > 0
        self.moe_bias_update_rate, self.moe_balance_loss = moe_bias_update_rate, moe_balance_loss

    # ---------------------------------------------------------------------------------------------- pieces
    def effective_params(self, params, frozen, rng=None, train: bool = False):
        if self.teacher is not None:
            frozen = {k: v for k, v in frozen.items() if k != "teacher"}
        if self.ptuning:  # trained: {"prefix": [L, 2, P, G, D]}; frozen: everything else
            return {**frozen, "model": {**frozen["model"], "prefix": params["prefix"]}}
        if self.lora is None:
            return params
        return lora_lib.merge(frozen, params, self.lora["alpha"], self.lora["rank"],
                              self.lora["dropout"] if train else 0.0, rng)

    def _forward(self, params, batch, return_hidden=False, moe_stats=False):
        """The model's output; with moe_stats also the routers' sown load statistics (`router_stats`)."""
        kw = {"return_hidden": True} if return_hidden else {}
        if moe_stats:
            kw["mutable"] = ["intermediates"]
        if "block_position_ids" in batch:  # GLM blank-infilling rows (train/blank_infilling.py): 2D positions
            kw.update(position_ids=batch["position_ids"], block_position_ids=batch["block_position_ids"],
                      context_ends=batch["context_ends"])
        with axis_rules():
            # no segment_ids (one unpadded document per row): plain causal attention, cuDNN's fast path
            out = self.model.apply({"params": params}, batch["input_ids"], segment_ids=batch.get("segment_ids"),
                                   **kw)
        return (out[0], router_stats(out[1])) if moe_stats else out

    def sums(self, params, batch, moe_stats=False, teacher_params=None):
        """(objective sum, aux sums) over one microbatch; with moe_stats, aux["moe"] = `router_stats`; with a
        teacher, aux["kl_sum"] (its parameters `teacher_params`)."""
        stats = []

        def forward(p, b, **kw):
            out = self._forward(p, b, moe_stats=moe_stats, **kw)
            if moe_stats:
                out, st = out
                stats.append(st)
            return out

        obj, aux = self._sums(params, batch, forward, teacher_params)
        return obj, ({**aux, "moe": stats[0]} if moe_stats else aux)

    def teacher_part(self, frozen):
        return frozen["teacher"] if self.teacher is not None else None

    def teacher_outputs(self, teacher_params, batch):
        """The frozen teacher's (logits, final hidden states or None when no hidden-state loss needs them)."""
        with axis_rules():
            out = self.teacher.apply({"params": teacher_params}, batch["input_ids"],
                                     segment_ids=batch.get("segment_ids"),
                                     return_hidden=bool(self.distill["hidden_weight"]))
            if self.distill["hidden_weight"]:
                out = (output_head(self.teacher.cfg).apply({"params": teacher_params["lm_head"]}, out), out)
            else:
                out = (out, None)
        return jax.lax.stop_gradient(out)

    def _sums(self, params, batch, forward, teacher_params=None):
        if self.task == "embedding":
            return self.contrastive_sums(params, batch, forward)
        if self.task == "cloze":
            return self.cloze_sums(params, batch, forward)
        if self.task != "classification" and (self.loss_chunk or self.mtp_loss_weight):
            hidden = forward(params, batch, return_hidden=True)
            chunk = self.loss_chunk or hidden.shape[1]
            obj, nll_sum = chunked_lm_sums(hidden, params["lm_head"]["kernel"], batch["targets"], batch["loss_mask"],
                                           self.z_loss, chunk, jnp.dtype(self.model.cfg.dtype))
            aux = {"loss_sum": nll_sum, "count": jnp.sum(batch["loss_mask"].astype(jnp.float32))}
            if self.mtp_loss_weight:
                mtp_obj, mtp_aux = self.mtp_sums(params, batch, hidden, chunk)
                obj, aux = obj + self.mtp_loss_weight * mtp_obj, {**aux, **mtp_aux}
            return obj, aux
        hidden = None
        if self.teacher is not None and self.distill["hidden_weight"]:
            hidden = forward(params, batch, return_hidden=True)
            with axis_rules():
                logits = output_head(self.model.cfg).apply({"params": params["lm_head"]}, hidden)
        else:
            logits = forward(params, batch)
        if self.task == "classification":
            return label_sums(logits, batch["labels"], self.z_loss)
        nll, z = lm_token_losses(logits, batch["targets"], self.z_loss)
        mask = batch["loss_mask"].astype(jnp.float32)
        data, aux = jnp.sum((nll + z) * mask), {"loss_sum": jnp.sum(nll * mask), "count": jnp.sum(mask)}
        if self.teacher is None:
            return data, aux
        d = self.distill
        t_logits, t_hidden = self.teacher_outputs(teacher_params, batch)
        kl = jnp.sum(distillation_kl(logits, t_logits, d["temperature"], d["kl"], d["top_k"]) * mask)
        obj, aux = d["alpha"] * kl + (1.0 - d["alpha"]) * data, {**aux, "kl_sum": kl}
        if hidden is not None:
            if d["hidden_channels"] is not None:  # a width-pruned student: the teacher's channels it kept
                t_hidden = jnp.take(t_hidden, jnp.asarray(d["hidden_channels"]), axis=-1)
            mse = jnp.sum(hidden_mse(hidden, t_hidden) * mask)
            obj, aux = obj + d["hidden_weight"] * mse, {**aux, "hidden_sum": mse}
        return obj, aux

    def cloze_sums(self, params, batch, forward):
        """GLM's cloze classification (docs/glm-objective.md): each label word's log-probability of filling the
        [MASK] (the sum over its tokens, from the <sop> on), cross-entropy over the label words."""
        b, c, s = batch["input_ids"].shape
        flat = {k: batch[k].reshape(b * c, s) for k in ("input_ids", "segment_ids")}
        nll, _ = lm_token_losses(forward(params, flat), batch["targets"].reshape(b * c, s), 0.0)
        scores = -jnp.sum(nll * batch["target_mask"].reshape(b * c, s), axis=-1).reshape(b, c)
        return label_sums(scores, batch["labels"], self.z_loss)

    def contrastive_sums(self, params, batch, forward):
        """InfoNCE (docs/knowledge.md, "Training an embedder"): every query against every passage of the
        microbatch (its positive, the other queries' positives and every hard negative), cosine similarities
        over the temperature, cross-entropy on the query's own positive. (sum of the losses, {"loss_sum",
        "correct", "count"})."""
        e = self.embedding
        queries = self._embed(params, batch["query_ids"], batch["query_segments"], forward)
        b, n, s = batch["passage_ids"].shape
        passages = self._embed(params, batch["passage_ids"].reshape(b * n, s),
                               batch["passage_segments"].reshape(b * n, s), forward)
        logits = queries @ passages.T / e["temperature"]  # [B, B * (1 + negatives)]
        labels = jnp.arange(b) * n  # each query's own positive
        nll = jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(b), labels]
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return jnp.sum(nll), {"loss_sum": jnp.sum(nll), "correct": jnp.sum(correct),
                              "count": jnp.asarray(b, jnp.float32)}

    def _embed(self, params, ids, segments, forward):
        hidden = forward(params, {"input_ids": ids, "segment_ids": segments}, return_hidden=True)
        return pool(hidden, segments > 0, self.embedding["pooling"])

    def mtp_sums(self, params, batch, hidden, chunk: int):
        """(mean over depths of each depth's nll sum, {"mtp_loss_sum", "mtp_hits", "mtp_count"} summed over
        depths) of the MTP layers over the main model's final hidden states."""
        cfg = self.model.cfg
        with axis_rules():
            normed, _, _ = MTPHead(cfg).apply({"params": params}, hidden, batch["input_ids"],
                                              segment_ids=batch.get("segment_ids"), return_hidden=True)
        obj = loss = hits = count = jnp.zeros((), jnp.float32)
        for d in range(cfg.num_mtp_layers):
            targets, mask = mtp_targets(batch["targets"], batch["loss_mask"], batch.get("segment_ids"), d)
            o, nll, h = chunked_lm_sums(normed[d], params["lm_head"]["kernel"], targets, mask, self.z_loss, chunk,
                                        jnp.dtype(cfg.dtype), with_hits=True)
            obj, loss, hits, count = obj + o, loss + nll, hits + h, count + jnp.sum(mask)
        return obj / cfg.num_mtp_layers, {"mtp_loss_sum": loss, "mtp_hits": hits, "mtp_count": count}

    @staticmethod
    def count(batch, task):
        if task in ("classification", "cloze"):
            return jnp.asarray(batch["labels"].size, jnp.float32)
        if task == "embedding":  # queries, over every leading (microbatch, row) axis
            return jnp.asarray(batch["query_ids"].size // batch["query_ids"].shape[-1], jnp.float32)
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))

    # ---------------------------------------------------------------------------------------------- steps
    def train_step(self, state, frozen, batch, hyper):
        """hyper: {"lr": f32 [], "skip_nonfinite": bool []} (host-side values, so they never recompile)."""
        total = jnp.maximum(self.count(batch, self.task), 1.0)
        lead = next(iter(batch.values())).shape
        n_seq = lead[0] * lead[1]  # sequences in the global batch (microbatches x rows)
        rng = jax.random.fold_in(state["rng"], state["step"])
        params = state["params"]

        def micro_loss(p, mb):
            eff = self.effective_params(p, frozen, rng, train=True)
            obj, aux = self.sums(eff, mb, moe_stats=self.moe, teacher_params=self.teacher_part(frozen))
            loss = obj / total
            if self.moe and self.moe_balance_loss:
                loss = loss + self.moe_balance_loss * balance_sum(aux["moe"]) / n_seq
            return loss, aux

        grads, aux = accumulate_grads(micro_loss, params, batch)
        loss = aux["loss_sum"] / jnp.maximum(aux["count"], 1.0)
        grad_norm = tree_l2_norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        lr = hyper["lr"].astype(jnp.float32)
        updates = jax.tree.map(lambda u: (-lr * u.astype(jnp.float32)).astype(u.dtype), updates)
        new_params = optax.apply_updates(params, updates)
        if self.moe and self.moe_bias_update_rate and self.lora is None and not self.ptuning:
            new_params = update_router_biases(new_params, aux["moe"], self.moe_bias_update_rate)
        # The update is checked too: a finite loss and gradient can still give non-finite parameters (an
        # overflowing float16 weight, an absurd learning rate), and those must never reach a checkpoint.
        update_finite = all_finite(new_params) & all_finite(opt_state)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & update_finite
        # on_nan=skip: a non-finite step keeps the old params and optimizer state (on_nan=stop: the host stops)
        take_new = finite | ~hyper["skip_nonfinite"]
        keep_old = lambda new, old: jnp.where(take_new, new, old)  # noqa: E731
        new_state = {"step": state["step"] + 1, "params": jax.tree.map(keep_old, new_params, params),
                     "opt_state": jax.tree.map(keep_old, opt_state, state["opt_state"]), "rng": state["rng"],
                     "skipped": state["skipped"] + (~take_new).astype(jnp.int32)}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr,
                   "tokens": aux["count"] if self.task == "lm" else total, "finite": finite,
                   "update_finite": update_finite,
                   "skipped": new_state["skipped"]}
        if self.task in ACCURACY_TASKS:
            metrics["accuracy"] = aux["correct"] / total
        if self.teacher is not None:  # "loss" stays the data loss, comparable with runs without a teacher
            metrics["kl"], metrics["data_loss"] = aux["kl_sum"] / jnp.maximum(aux["count"], 1.0), loss
            if "hidden_sum" in aux:
                metrics["hidden_mse"] = aux["hidden_sum"] / jnp.maximum(aux["count"], 1.0)
        if self.mtp_loss_weight:
            mtp_count = jnp.maximum(aux["mtp_count"], 1.0)
            metrics["mtp_loss"], metrics["mtp_accuracy"] = aux["mtp_loss_sum"] / mtp_count, aux["mtp_hits"] / mtp_count
        if self.moe:
            metrics.update(load_metrics(aux["moe"]))
            if self.moe_balance_loss:
                metrics["moe_balance"] = balance_sum(aux["moe"]) / n_seq
        return new_state, metrics

    def eval_step(self, state, frozen, batch):
        eff = self.effective_params(state["params"], frozen)
        _, aux = self.sums(eff, batch, teacher_params=self.teacher_part(frozen))
        return aux

    # ---------------------------------------------------------------------------------------------- jit
    def jit_train(self, state_shardings, frozen_shardings, batch_shardings):
        repl = NamedSharding(next(iter(jax.tree.leaves(batch_shardings))).mesh, P())
        return jax.jit(self.train_step, in_shardings=(state_shardings, frozen_shardings, batch_shardings, repl),
                       out_shardings=(state_shardings, repl), donate_argnums=(0,))

    def jit_eval(self, state_shardings, frozen_shardings, batch_shardings):
        repl = NamedSharding(next(iter(jax.tree.leaves(batch_shardings))).mesh, P())
        return jax.jit(self.eval_step, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                       out_shardings=repl)


def accumulate_grads(loss_fn, params, batch):
    """(gradient, aux sums) of loss_fn(params, microbatch) -> (loss, aux) over the batch's microbatches (leading
    axis), summed; scanned when there is more than one."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n_micro = jax.tree.leaves(batch)[0].shape[0]
    if n_micro == 1:
        (_, aux), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
        return grads, aux

    def body(carry, mb):
        g_acc, a_acc = carry
        (_, aux), g = grad_fn(params, mb)
        g_acc = jax.tree.map(lambda s, x: s + x.astype(jnp.float32), g_acc, g)
        return (g_acc, jax.tree.map(jnp.add, a_acc, aux)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    aux0 = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                        jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], batch))[1]))
    (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), batch)
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), aux


def router_stats(variables) -> dict:
    """{router path ("model/moe_layers/mlp/router"): {"expert_counts": [L, E], "balance_terms": [L]}} from the
    "intermediates" the routers sowed (layers/moe.py; stacked over the layers of a scan, [E] / [] unstacked).
    A router's path is also where its parameters are, e_score_correction_bias included."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get("intermediates", {})):
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
        name = keys[-2]  # sow appends to a tuple: the last key is its index
        out.setdefault("/".join(keys[:-2]), {})[name] = leaf.astype(jnp.float32)
    return out


def balance_sum(stats: dict) -> jax.Array:
    """The sequence-wise balance terms (layers/moe.py, load_stats) summed over the layers and sequences."""
    return sum(jnp.sum(r["balance_terms"]) for r in stats.values())


def _layer_order(router_path: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", router_path)]


def update_router_biases(params, stats: dict, rate: float):
    """Auxiliary-loss-free balancing (DeepSeek-V3, GLM-4.5): every router's e_score_correction_bias moves by
    rate * sign(mean load - load), so an expert chosen more than the average is chosen less next step.
    `stats`: `router_stats` summed over the step's batch. Outside the gradient; float32 like the bias."""
    params = jax.tree.map(lambda x: x, params)  # shallow copy of the nested dicts
    for router, st in stats.items():
        load = st["expert_counts"]
        node = params
        for k in router.split("/"):
            node[k] = dict(node[k])
            node = node[k]
        bias = node["e_score_correction_bias"]
        step = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        node["e_score_correction_bias"] = (bias.astype(jnp.float32) + step).astype(bias.dtype)
    return params


def load_metrics(stats: dict) -> dict:
    """Per MoE layer (in layer order): min / max tokens per expert and their coefficient of variation
    (std / mean over the experts; 0 = perfectly balanced)."""
    load = jnp.concatenate([stats[r]["expert_counts"].reshape(-1, stats[r]["expert_counts"].shape[-1])
                            for r in sorted(stats, key=_layer_order)], axis=0)
    mean = jnp.mean(load, axis=-1)
    return {"moe_load_min": jnp.min(load, axis=-1), "moe_load_max": jnp.max(load, axis=-1),
            "moe_load_cv": jnp.std(load, axis=-1) / jnp.maximum(mean, 1e-9)}


def all_finite(tree) -> jax.Array:
    """True when every float in `tree` is finite (one fused reduction per leaf, on the device)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def make_state(params, tx, seed: int) -> dict[str, Any]:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(seed),
            "skipped": jnp.zeros((), jnp.int32)}


def state_shardings(abstract_state, param_shardings_tree, tx, mesh):
    """Shardings for the state: params as given, optimizer moments like their params, the rest replicated."""
    repl = NamedSharding(mesh, P())
    frozen = optax.MaskedNode  # a frozen parameter's place in multi_transform's state: no array, no sharding
    opt = optax.tree_map_params(tx, lambda x, s: x if isinstance(x, frozen) else s, abstract_state["opt_state"],
                                param_shardings_tree, transform_non_params=lambda _: repl,
                                is_leaf=lambda x: isinstance(x, frozen))
    return {"step": repl, "params": param_shardings_tree, "opt_state": opt, "rng": repl, "skipped": repl}
