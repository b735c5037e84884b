"""Pure top-k KD (distill_loss_weight = 1) trains a usable student only with the tail bucket.

A tiny student (embedding → MLP → V logits) learns next-token distributions from a Zipf-shaped teacher
(V = 256, entropy ≈ 4.0 nats) through ``distill_loss`` with w = 1 and the teacher's top-8, as the
pipeline runs it. Renormalised over the top-8, nothing tells the student how much mass belongs outside
those tokens, and its held-out full-vocabulary cross-entropy stays far from the teacher's (≈ 5.3 nats
here, 5.6 at initialisation); with the tail bucket it learns the teacher's mass outside the top-8 as well
(≈ 4.75: the rest of the gap is the shape inside the tail, which top-k targets do not carry).
"""

import pytest
import torch
import torch.nn.functional as F

from distill_trainer.distill_loss import LossConfig, TeacherTargets, distill_loss
from distill_trainer.losses import topk_teacher_logits

torch.set_num_threads(1)

CONTEXTS, V, WIDTH, K = 32, 256, 64, 8
STEPS, BATCH, LR = 200, 64, 1e-2
BOUND = 5.0  # nats of held-out cross-entropy: teacher entropy (≈ 4.0) + 1


def _teacher(generator: torch.Generator) -> torch.Tensor:
    """[CONTEXTS, V] logits: the same Zipf(1.1) shape per context, over a random order of the vocabulary."""
    zipf = -1.1 * torch.arange(1, V + 1, dtype=torch.float64).log()
    return torch.stack([zipf[torch.randperm(V, generator=generator)] for _ in range(CONTEXTS)]).float()


def _train_pure_topk_kd(seed: int, topk_tail: bool) -> tuple[float, float, float]:
    """(held-out CE of the student, its mass on the teacher's top-k, the teacher's) after STEPS of w = 1 KD."""
    generator = torch.Generator().manual_seed(seed)
    teacher = _teacher(generator)
    p = torch.softmax(teacher.double(), -1)
    held_out_context = torch.randint(0, CONTEXTS, (4000,), generator=generator)
    held_out_next = torch.multinomial(p[held_out_context], 1, generator=generator).squeeze(1)
    torch.manual_seed(seed)
    student = torch.nn.Sequential(
        torch.nn.Embedding(CONTEXTS, WIDTH), torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, V)
    )
    optimizer = torch.optim.Adam(student.parameters(), lr=LR)
    cfg = LossConfig(distill_loss_weight=1.0, logits_topk=K, topk_tail=topk_tail)
    for _ in range(STEPS):
        context = torch.randint(0, CONTEXTS, (BATCH,), generator=generator)
        labels = torch.multinomial(p[context], 1, generator=generator).view(1, BATCH)  # CE is reported, not trained
        top = topk_teacher_logits(teacher[context], K, tail_temperature=1.0)
        targets = TeacherTargets(top.values, top.indices, top.tail_logmass)
        terms = distill_loss(student(context).unsqueeze(0), labels, targets, cfg, normalizer=float(BATCH))
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = student(torch.arange(CONTEXTS))
        top_indices = teacher.topk(K, -1).indices
        student_mass = torch.softmax(logits.double(), -1).gather(1, top_indices).sum(1).mean().item()
        teacher_mass = p.gather(1, top_indices).sum(1).mean().item()
        held_out_ce = F.cross_entropy(student(held_out_context), held_out_next).item()
    return held_out_ce, student_mass, teacher_mass


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_topk_kd_keeps_the_student_usable_only_with_the_tail(seed):
    with_tail, mass_with_tail, teacher_mass = _train_pure_topk_kd(seed, topk_tail=True)
    renormalised, mass_renormalised, _ = _train_pure_topk_kd(seed, topk_tail=False)
    assert with_tail < BOUND, f"with the tail: held-out CE {with_tail:.3f} ≥ {BOUND}"
    assert renormalised > BOUND, f"renormalised: held-out CE {renormalised:.3f} ≤ {BOUND} (expected it to fail)"
    # The tail teaches how much mass the top-k holds; renormalised KD never sees it.
    assert abs(mass_with_tail - teacher_mass) < 0.03
    assert abs(mass_renormalised - teacher_mass) > 0.1
