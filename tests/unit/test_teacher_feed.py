"""The student's side of the overlap, micro-batch by micro-batch: a streaming strategy takes each micro-batch's
teacher targets only when it starts that micro-batch, and taking the next one frees the previous one's channel
slot, so a two-slot channel is a bounded queue (the teacher writes micro-batch k+1 while the student trains on k,
and waits rather than overwrite what the student still reads). Real shared-memory channel, no Ray."""

import pytest
import torch

from distill_trainer.channel import LogitsReceiver, SlotBusyError, make_transport
from distill_trainer.distill_loss import TeacherTargets
from distill_trainer.workers import TeacherOutput, _StreamedMicroBatches, _TeacherFeed


def batch():
    ids = torch.zeros(1, 3, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[-100, 1, 2]])}


def test_a_streaming_student_frees_each_micro_batch_slot_when_it_takes_the_next():
    publisher, receiver = make_transport("shared_memory", slots=2), LogitsReceiver()
    publisher.wait_seconds = 0.2
    values = [torch.full((2, 5), float(i)) for i in range(4)]

    def publish(i):  # the teacher's output for micro-batch i
        return TeacherOutput(publisher.publish(TeacherTargets(values[i]).tensors()), (2,), 0.5, 0.25)

    def teacher_is_blocked():
        try:
            publisher.publish({"values": torch.zeros(2, 5)})
        except SlotBusyError:
            return True
        return False

    try:
        outputs = [publish(0), publish(1), None, None]  # both slots written; 2 and 3 come when the teacher can
        feed = _TeacherFeed(receiver, outputs, 4, torch.device("cpu"))
        stream = iter(_StreamedMicroBatches([batch() for _ in range(4)], feed))

        first = next(stream)
        assert torch.equal(first.teacher.values, values[0])
        assert teacher_is_blocked()  # slot 0 is micro-batch 0's: the student is still on it

        second = next(stream)  # micro-batch 0 is done: its slot is free
        outputs[2] = publish(2)
        assert teacher_is_blocked()  # slot 1 is micro-batch 1's
        assert torch.equal(second.teacher.values, values[1])
        assert torch.equal(first.teacher.values, values[0]) is False  # slot 0 now holds micro-batch 2: released

        third = next(stream)
        outputs[3] = publish(3)
        fourth = next(stream)
        assert torch.equal(third.teacher.values, values[2]) and torch.equal(fourth.teacher.values, values[3])
        publisher.publish({"values": torch.zeros(2, 5)})  # slot 0 (micro-batch 2's) is free again
        assert teacher_is_blocked()  # slot 1: the last micro-batch is held until the step is done with it

        feed.release_all()
        assert not teacher_is_blocked()
        assert (feed.forward_seconds, feed.publish_seconds) == (2.0, 1.0)  # summed over the four micro-batches
    finally:
        receiver.close()
        publisher.close()


def test_every_micro_batch_can_be_taken_up_front_and_a_rank_without_logits_gets_none():
    publisher, receiver = make_transport("shared_memory", slots=3), LogitsReceiver()
    try:
        values = [torch.full((2, 5), float(i)) for i in range(2)]
        outputs = [TeacherOutput(publisher.publish(TeacherTargets(v).tensors()), (2,), 0.0, 0.0) for v in values]
        feed = _TeacherFeed(receiver, outputs, 2, torch.device("cpu"))
        taken = [feed.targets(i) for i in range(2)]  # what a non-streaming strategy gets
        assert [float(t.values[0, 0]) for t in taken] == [0.0, 1.0]
        feed.release_all()

        empty = _TeacherFeed(receiver, [TeacherOutput(None, (), 0.0, 0.0)] * 2, 2, torch.device("cpu"))
        assert [empty.targets(i) for i in range(2)] == [None, None]
        assert [_TeacherFeed(receiver, None, 3, torch.device("cpu")).targets(i) for i in range(3)] == [None] * 3
        with pytest.raises(ValueError, match="1 teacher outputs for 2 micro-batches"):
            _TeacherFeed(receiver, outputs[:1], 2, torch.device("cpu"))
    finally:
        receiver.close()
        publisher.close()


def test_channel_slots_are_a_two_micro_batch_queue_for_a_streaming_student_and_two_steps_otherwise(tmp_path):
    from distill_trainer.config import config_from_dict
    from distill_trainer.workers import channel_slots

    def config(**overrides):
        student = {"training_args": {"gradient_accumulation_steps": 3}, "data_args": {"file_name": "x.jsonl"},
                   "strategy_args": {"strategy_name": overrides.pop("student_strategy", "torch_train")}}
        data = {"student_pretrain": str(tmp_path), "teacher_pretrain": str(tmp_path), "output_dir": str(tmp_path),
                "max_steps": 4, "student": student, **overrides}
        return config_from_dict(data, "<test>")

    assert channel_slots(config()) == 2  # torch student, overlap on: streams
    assert channel_slots(config(overlap_teacher=False)) == 6  # takes turns: a step held, a step written
    megatron = config(student_strategy="megatron_train", teacher={"strategy_args": {"strategy_name": "megatron_infer"}})
    assert channel_slots(megatron) == 6  # Megatron's schedule takes a step's micro-batches at once
