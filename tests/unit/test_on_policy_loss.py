"""The losses on sampled completions against float64 references on a hand-built batch: the KD term alone (GKD) and
ROLL's sampled reverse KL as an importance-weighted policy gradient; the same masking and normaliser as off-policy;
no cross-entropy on sampled tokens; the fused head and the vocabulary-parallel (TP=2) paths equal the logits path."""

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill_trainer.config import config_from_dict, startup_warnings
from distill_trainer.distill_loss import LossConfig, TeacherTargets, VocabShard, make_loss_fn
from distill_trainer.sampling import SAMPLER_STUDENT, SAMPLER_TEACHER
from distill_trainer.strategies.base import MicroBatch

B, T, V = 2, 5, 7
NORMALIZER = 11.0  # label tokens of a global batch larger than this micro-batch
LABELS = torch.tensor([[-100, 3, 1, 6, -100], [-100, -100, 0, 4, 2]])


def _batch(sampler: int, full_vocab: bool = True):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    mask = LABELS != -100
    rows_t = teacher[mask]
    tokens = LABELS[mask]
    teacher_logp = torch.log_softmax(rows_t, -1).gather(1, tokens[:, None]).squeeze(1)
    behaviour = torch.log_softmax(student[mask] / 0.8, -1).gather(1, tokens[:, None]).squeeze(1)  # a tempered sampler
    targets = TeacherTargets(rows_t.float(), label_logprobs=teacher_logp.float()) if full_vocab else None
    batch = MicroBatch(torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long), LABELS, targets,
                       sampler=sampler, behaviour_logprobs=behaviour.float())
    return student, teacher, batch, teacher_logp, behaviour


def _reference_reverse_kl(student, teacher):
    """Σ KL(q ‖ p) over the label rows, float64."""
    mask = LABELS != -100
    lq, lp = torch.log_softmax(student[mask], -1), torch.log_softmax(teacher[mask], -1)
    return (lq.exp() * (lq - lp)).sum()


def test_sampled_micro_batches_get_the_kd_term_alone_and_dataset_ones_the_weighted_sum():
    cfg = LossConfig(distill_loss_weight=0.3, kd_objective="reverse_kl")
    for sampler in (SAMPLER_STUDENT, SAMPLER_TEACHER, 0):
        student, teacher, batch, _, _ = _batch(sampler)
        logits = student.float().requires_grad_()
        terms = make_loss_fn(cfg, NORMALIZER)(logits, batch)
        terms.loss.backward()
        reference_logits = student.clone().requires_grad_()
        kd = _reference_reverse_kl(reference_logits, teacher)
        ce = torch.nn.functional.cross_entropy(reference_logits[LABELS != -100], LABELS[LABELS != -100], reduction="sum")
        reference = kd / NORMALIZER if sampler else (0.7 * ce + 0.3 * kd) / NORMALIZER
        reference.backward()
        assert terms.label_tokens == 6
        assert abs(float(terms.loss.detach()) - float(reference.detach())) < 1e-6
        assert torch.allclose(logits.grad.double(), reference_logits.grad, atol=1e-7)
        assert abs(float(terms.ce_sum) - float(ce)) < 1e-4  # CE is still reported
        assert abs(float(terms.kd_sum) - float(kd)) < 1e-4


def test_sampled_reverse_kl_is_the_importance_weighted_policy_gradient_of_roll():
    coef = 1.7
    cfg = LossConfig(distill_loss_weight=0.3, on_policy_loss="sampled_reverse_kl", opd_kl_coef=coef)
    student, _, batch, teacher_logp, behaviour = _batch(SAMPLER_STUDENT)
    logits = student.float().requires_grad_()
    terms = make_loss_fn(cfg, NORMALIZER)(logits, batch)
    terms.loss.backward()

    reference_logits = student.clone().requires_grad_()
    mask = LABELS != -100
    log_q = torch.log_softmax(reference_logits[mask], -1).gather(1, LABELS[mask][:, None]).squeeze(1)
    advantage = -coef * (log_q.detach() - teacher_logp)  # detached: no gradient through the advantage
    reference = -(torch.exp(log_q - behaviour) * advantage).sum() / NORMALIZER
    reference.backward()
    assert terms.label_tokens == 6
    assert abs(float(terms.loss) - float(reference)) < 1e-6
    assert torch.allclose(logits.grad.double(), reference_logits.grad, atol=1e-7)
    assert abs(float(terms.kd_sum) - float((log_q - teacher_logp).sum())) < 1e-5  # the sampled k1 estimate
    assert abs(float(terms.ce_sum) + float(log_q.sum())) < 1e-5
    # Nothing reaches positions without a label (the prompt, padding), in any mode.
    assert float(logits.grad[~mask].abs().max()) == 0.0


def test_with_the_students_own_unfiltered_samples_the_gradient_is_the_score_function_one():
    """ratio 1 (behaviour = the student now): ∂loss/∂z = coef · (log q − log p) · ∂log q/∂z / N, with
    ∂log q(a)/∂z = onehot(a) − softmax(z): descent lowers q(a) where the student puts more on a than the teacher."""
    coef = 1.0
    student, _, batch, teacher_logp, _ = _batch(SAMPLER_STUDENT)
    mask = LABELS != -100
    log_q = torch.log_softmax(student[mask], -1)
    own = log_q.gather(1, LABELS[mask][:, None]).squeeze(1)
    batch.behaviour_logprobs = own.float()
    logits = student.float().requires_grad_()
    make_loss_fn(LossConfig(1.0, on_policy_loss="sampled_reverse_kl"), NORMALIZER)(logits, batch).loss.backward()
    onehot = torch.nn.functional.one_hot(LABELS[mask], V).double()
    expected = coef * (own - teacher_logp)[:, None] * (onehot - log_q.exp()) / NORMALIZER
    assert torch.allclose(logits.grad[mask].double(), expected, atol=1e-6)


@pytest.mark.parametrize("on_policy_loss", ["kd", "sampled_reverse_kl"])
def test_the_fused_head_gives_the_logits_paths_loss_and_gradients(on_policy_loss):
    g = torch.Generator().manual_seed(1)
    n, d = 6, 4
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(V, d, generator=g)
    tokens = torch.tensor([3, 1, 6, 0, 4, 2])
    teacher = torch.randn(n, V, generator=g)
    targets = TeacherTargets(teacher, label_logprobs=torch.log_softmax(teacher, -1).gather(1, tokens[:, None]).squeeze(1))
    batch = MicroBatch(torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.long), tokens[None], targets,
                       sampler=SAMPLER_STUDENT, behaviour_logprobs=torch.randn(n, generator=g) - 2)
    loss_fn = make_loss_fn(LossConfig(0.5, kd_objective="reverse_kl", on_policy_loss=on_policy_loss), NORMALIZER)
    grads = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        terms = loss_fn.fused_head(h, w, None, tokens, batch) if fused else loss_fn((h @ w.t())[None], batch)
        terms.loss.backward()
        grads.append((float(terms.loss), h.grad, w.grad, float(terms.kd_sum)))
    (la, ha, wa, ka), (lb, hb, wb, kb) = grads
    assert abs(la - lb) < 1e-6 and abs(ka - kb) < 1e-5
    assert torch.allclose(ha, hb, atol=1e-6) and torch.allclose(wa, wb, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SPLIT = 3  # rank 0 holds vocabulary columns [0, 3), rank 1 [3, 7)


def _tp_rank(rank: int, port: int, errors) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        student, _, batch, _, _ = _batch(SAMPLER_STUDENT)
        cfg = LossConfig(1.0, on_policy_loss="sampled_reverse_kl", opd_kl_coef=1.3)
        whole = student.float().requires_grad_()
        expected = make_loss_fn(cfg, NORMALIZER)(whole, batch)
        expected.loss.backward()
        start, stop = (0, SPLIT) if rank == 0 else (SPLIT, V)
        part = student[..., start:stop].float().requires_grad_()
        terms = make_loss_fn(cfg, NORMALIZER)(part, batch, VocabShard(dist.group.WORLD, start, stop - start))
        terms.loss.backward()
        assert abs(float(terms.loss) - float(expected.loss)) < 1e-6
        assert abs(float(terms.kd_sum) - float(expected.kd_sum)) < 1e-5
        assert torch.allclose(part.grad, whole.grad[..., start:stop], atol=1e-7)
    except BaseException:
        errors.put(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_vocabulary_parallel_sampled_reverse_kl_equals_the_whole_vocabulary():
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_tp_rank, args=(_free_port(), errors), nprocs=2, start_method="spawn")
    assert errors.empty()


def test_filtered_sampling_with_the_sampled_reverse_kl_is_warned_about():
    base = dict(student_pretrain="s", teacher_pretrain="t", max_steps=1, student={"data_args": {"file_name": "x"}})
    filtered = config_from_dict({**base, "use_opd": True, "generation": {"temperature": 0.9}})
    assert any("unbiased estimate only" in w for w in startup_warnings(filtered, has_chat_template=True))
    plain = config_from_dict({**base, "use_opd": True})
    assert not any("unbiased" in w for w in startup_warnings(plain, has_chat_template=True))


def test_eval_onpolicy_rkl_without_a_live_teacher_is_warned_about():
    base = dict(student_pretrain="s", teacher_pretrain="t", max_steps=1, student={"data_args": {"file_name": "x"}})
    sft = config_from_dict({**base, "distill_loss_weight": 0, "eval_onpolicy_rkl": True})
    assert any("eval_onpolicy_rkl=true is not reported" in w for w in startup_warnings(sft, has_chat_template=True))
