"""Students, distillation losses and the distillation loop, on tiny models and real UCM images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from training.config import ConfigError, TextTowerConfig, config_from_dict
from training.distill import (CosineAgreementLoss, DistillObjective, SimilarityStructureLoss, bit_agreement,
                              distill)
from training.models import HashHead, TextEncoder
from training.students import (DistillLossConfig, ImageStudent, ImageStudentConfig, TextStudentConfig,
                               build_text_student, distill_config_from_dict, evenly_spaced_layers, student_source,
                               load_image_student, load_text_student)
from serving.ingest.dataset import load_dataset
from training.train import DatasetIndex, LoopContext, fit


# ---- losses, on cases computed by hand


def test_cosine_agreement_by_hand():
    h_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    h_t = torch.tensor([[2.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = CosineAgreementLoss()(h_s, h_t)  # cos = 1 and 0 -> mean(0, 1) = 0.5
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert h_t.grad is None and h_s.grad is not None  # the teacher is a fixed target
    with pytest.raises(ValueError, match="both be"):
        CosineAgreementLoss()(h_s, h_t[:1])


def test_similarity_structure_by_hand():
    h_s = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # S_S = identity
    h_t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # S_T = all ones
    assert SimilarityStructureLoss()(h_s, h_t).item() == pytest.approx(0.5)  # two off-diagonal 1s of 4
    assert SimilarityStructureLoss()(h_t * 5, h_t).item() == pytest.approx(0.0)  # only directions count


def test_objective_names_terms_and_skips_zero_weights():
    h_s, h_t = torch.tensor([[0.5, -0.5], [0.9, 0.1]]), torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    full = DistillObjective(DistillLossConfig())(h_s, h_t)
    assert set(full) == {"cosine", "quantization", "similarity"}
    objective = DistillObjective(DistillLossConfig(weights={"cosine": 2.0, "quantization": 0.0, "similarity": 1.0}))
    terms = objective(h_s, h_t)
    assert set(terms) == {"cosine", "similarity"}
    assert objective.total(terms).item() == pytest.approx(2 * terms["cosine"].item() + terms["similarity"].item())


def test_bit_agreement_counts_zero_as_plus_one():
    a = np.array([[0.0, -0.2, 0.3, 0.1]])
    assert bit_agreement(a, np.array([[1.0, -1.0, 1.0, -1.0]])) == 0.75


# ---- configs and students


def test_distill_config_rejects_unknown_keys_students_and_terms():
    assert distill_config_from_dict({}).students == ("image", "text")
    with pytest.raises(ConfigError, match="unknown key"):
        distill_config_from_dict({"image": {"backbon": "x"}})
    with pytest.raises(ConfigError, match="students"):
        distill_config_from_dict({"students": ["audio"]})
    with pytest.raises(ConfigError, match="unknown term"):
        distill_config_from_dict({"loss": {"weights": {"cosin": 1.0}}})


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(2, 6) == (2, 5)
    assert evenly_spaced_layers(3, 6) == (1, 3, 5)
    assert evenly_spaced_layers(6, 6) == tuple(range(6))
    with pytest.raises(ConfigError, match="num_layers"):
        evenly_spaced_layers(7, 6)


def test_text_student_copies_the_chosen_teacher_layers(tiny_text_encoder):
    teacher = TextEncoder(TextTowerConfig(encoder=str(tiny_text_encoder), max_length=16))
    head = HashHead(teacher.feature_dim, 8, (16,))
    student = build_text_student(TextStudentConfig(num_layers=1, layers=(1,)), teacher, head)
    assert student.model.config.num_hidden_layers == 1 and student.max_length == 16
    mine, theirs = student.model.encoder.layer[0].state_dict(), teacher.model.encoder.layer[1].state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not torch.equal(mine["attention.self.query.weight"],
                           teacher.model.encoder.layer[0].state_dict()["attention.self.query.weight"])
    assert torch.equal(student.model.embeddings.word_embeddings.weight, teacher.model.embeddings.word_embeddings.weight)
    assert torch.equal(student.head.mlp[-1].weight, head.mlp[-1].weight) and student.head is not head
    tokens = teacher.tokenize(["a plane on the runway", "trees"])
    codes = student.eval()(tokens["input_ids"], tokens["attention_mask"])
    assert codes.shape == (2, 8) and codes.abs().max() < 1
    with pytest.raises(ConfigError, match="layers"):
        build_text_student(TextStudentConfig(num_layers=1, layers=(2,)), teacher, head)


def test_a_text_student_copies_a_small_bert_when_the_teacher_is_wider_and_not_bert(tiny_text_encoder, tmp_path):
    """An MPNet-like teacher (not BERT, twice as wide): the student copies the named BERT encoder's layers
    and tokenizer, and its head starts fresh at that width with the teacher's hidden widths and bits."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_encoder)
    small = TextEncoder(TextTowerConfig(encoder=str(tiny_text_encoder), max_length=16))
    hidden = 2 * small.feature_dim
    folder = tmp_path / "wide_mpnet"
    MPNetModel(MPNetConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=2 * hidden, max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    teacher = TextEncoder(TextTowerConfig(encoder=str(folder), max_length=16))
    head = HashHead(teacher.feature_dim, 8, (24,))
    with pytest.raises(ConfigError, match="BERT"):
        build_text_student(TextStudentConfig(num_layers=1), teacher, head)
    config = TextStudentConfig(num_layers=1, encoder=str(tiny_text_encoder))
    source = student_source(config, teacher)
    student = build_text_student(config, teacher, head, source)
    theirs = small.model.encoder.layer[-1].state_dict()
    assert all(torch.equal(student.model.encoder.layer[0].state_dict()[k], theirs[k]) for k in theirs)
    linear = [m for m in student.head.mlp if isinstance(m, torch.nn.Linear)]
    assert linear[0].in_features == small.feature_dim and student.head.nbits == 8
    assert [m.out_features for m in linear] == [24, 8]
    assert source.tokenizer.vocab == tokenizer.vocab and student.max_length == 16
    tokens = source.tokenize(["a plane on the runway"])
    assert student.eval()(tokens["input_ids"], tokens["attention_mask"]).shape == (1, 8)


def test_image_student_maps_pixels_to_codes():
    student = ImageStudent(ImageStudentConfig(backbone="test_efficientnet", weights="none", image_size=64,
                                              pool_levels=(1,), head_hidden=(16,)), 12).eval()
    codes = student(torch.randn(3, 3, 64, 64))
    assert codes.shape == (3, 12) and codes.abs().max() < 1


# ---- the loop


class RecordingContext(LoopContext):
    """The plain one-process context, recording the loop's touch-points."""

    def __init__(self):
        super().__init__()
        self.prepared, self.reports, self.shards = [], [], []

    def shard(self, rows):
        self.shards.append(len(rows))
        return super().shard(rows)

    def prepare(self, step):
        self.prepared.append(type(step).__name__)
        return step

    def report(self, epoch, record, out, state, **outputs):
        self.reports.append((epoch, sorted(record)))


@pytest.fixture(scope="module")
def tiny_teacher(subset, tiny_text_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    fit(config_from_dict(tiny_config(tiny_text_encoder, epochs=2)), subset, out,
        cache_dir=out / "cache", progress=False)
    return out


def test_distill_reduces_the_loss_and_writes_students_chosen_on_val(tiny_teacher, subset, tmp_path):
    config = distill_config_from_dict({
        "image": {"backbone": "test_efficientnet", "weights": "none", "image_size": 64, "pool_levels": [],
                  "head_hidden": [32], "epochs": 6, "batch_size": 6, "views": [0, 5], "lr": 3e-3},
        "text": {"num_layers": 1, "epochs": 4, "batch_size": 16, "lr": 1e-3},
        "eval_every": 2, "device": "cpu", "warmup_epochs": 0})
    context = RecordingContext()
    metrics = distill(tiny_teacher, config, subset, tmp_path / "students", cache_dir=tmp_path / "cache",
                      progress=False, context=context)
    for kind in ("image", "text"):
        history = metrics["students"][kind]["history"]
        first, last = history[0]["loss"], history[-1]["loss"]
        assert last["total"] < first["total"], (kind, first, last)
        assert last["cosine"] < first["cosine"], kind
        best = metrics["students"][kind]["best"]
        assert best["epoch"] in [h["epoch"] for h in history if "val_bit_agreement" in h]
    # 12 train images (never val or test) and their distinct captions; evaluation every 2 epochs
    index = DatasetIndex.build(load_dataset(subset))
    distinct = len({index.captions[c] for r in index.rows("train") for c in index.captions_of[r]})
    assert distinct < 60 and context.shards == [12, distinct] and context.prepared == ["HashHead", "TextStudent"]
    assert [e for e, _ in context.reports] == [2, 4, 6, 2, 4]
    saved = json.loads((tmp_path / "students" / "metrics.json").read_text())
    assert saved["bits"] == 16 and saved["students"]["text"]["best"] == metrics["students"]["text"]["best"]

    image, state = load_image_student(tmp_path / "students")
    assert state["epoch"] == metrics["students"]["image"]["best"]["epoch"]
    assert image(torch.zeros(2, 3, 64, 64)).shape == (2, 16)
    text, tokenizer, _ = load_text_student(tmp_path / "students")
    tokens = tokenizer(["a runway"], return_tensors="pt")
    assert text(tokens["input_ids"], tokens["attention_mask"]).shape == (1, 16)


def test_distill_without_teacher_checkpoint_fails_clearly(subset, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        distill(tmp_path / "nowhere", distill_config_from_dict({"device": "cpu"}), subset, tmp_path / "out")


def test_distill_can_train_the_image_backbone_on_decoded_images(tiny_teacher, subset, tmp_path):
    image = {"backbone": "test_efficientnet", "weights": "none", "image_size": 64, "pool_levels": [],
             "head_hidden": [], "epochs": 1, "batch_size": 6, "views": [0, 3]}
    encoders = {}
    for frozen in (True, False):
        config = distill_config_from_dict({"students": ["image"], "device": "cpu", "eval_every": 1,
                                           "image": {**image, "freeze_backbone": frozen}})
        distill(tiny_teacher, config, subset, tmp_path / str(frozen), progress=False)
        encoders[frozen] = load_image_student(tmp_path / str(frozen))[0].encoder.state_dict()
        assert not (tmp_path / str(frozen) / "text_student.pt").exists()
    torch.manual_seed(config.seed)  # the random init distill starts from
    start = ImageStudent(config.image, 16).encoder.state_dict()
    assert all(torch.equal(start[k], encoders[True][k]) for k in start)  # frozen: untouched
    assert any(not torch.equal(start[k], encoders[False][k]) for k in start if start[k].is_floating_point())


def test_the_text_student_also_learns_reworded_captions_with_the_teachers_codes(tiny_teacher, subset, tmp_path):
    """caption_variants: each distinct train caption's reworded copies join the rows the text student
    trains on, each with the teacher's own code of that wording as its target; val stays as written."""
    from training.distill import _TextTask, _unique_caption_rows, teacher_targets
    from training.train import text_codes

    config = distill_config_from_dict({"students": ["text"], "device": "cpu", "eval_every": 1,
                                       "text": {"num_layers": 1, "epochs": 1, "batch_size": 16,
                                                "caption_variants": 2}})
    targets = teacher_targets(tiny_teacher, subset, tmp_path / "cache", torch.device("cpu"))
    task = _TextTask(config, targets, torch.device("cpu"))
    rows = _unique_caption_rows(targets.index, targets.index.rows("train"))
    grown = task.with_variants(rows, targets, seed=0)
    assert len(grown) == 3 * len(rows) and list(grown[:len(rows)]) == list(rows)
    added = [task.captions[r] for r in grown[len(rows):]]
    assert sum(a != targets.index.captions[r] for a, r in zip(added, np.tile(rows, 2))) > len(rows) // 2  # reworded
    expected = text_codes(targets.model, added[:5], torch.device("cpu"))
    np.testing.assert_allclose(task.targets[grown[len(rows):len(rows) + 5]].numpy(), expected, atol=1e-5)
    again = _TextTask(config, targets, torch.device("cpu")).with_variants(rows, targets, seed=0)
    assert list(again) == list(grown)
    context = RecordingContext()
    distill(tiny_teacher, config, subset, tmp_path / "students", cache_dir=tmp_path / "cache", progress=False,
            context=context)
    assert context.shards == [len(grown)]


def test_a_text_student_can_keep_its_word_embeddings_as_copied(tiny_teacher, subset, tmp_path):
    """train_embeddings false: the word embeddings stay the encoder's, the layers and head still learn."""
    from training.distill import teacher_targets

    students = {}
    for train in (True, False):
        config = distill_config_from_dict({"students": ["text"], "device": "cpu", "eval_every": 1,
                                           "text": {"num_layers": 1, "epochs": 1, "batch_size": 16, "lr": 1e-3,
                                                    "train_embeddings": train}})
        distill(tiny_teacher, config, subset, tmp_path / str(train), progress=False)
        students[train] = load_text_student(tmp_path / str(train))[0].model
    source = teacher_targets(tiny_teacher, subset).model.text_encoder.model
    copied = source.get_input_embeddings().weight
    assert torch.equal(students[False].get_input_embeddings().weight, copied)
    assert not torch.equal(students[True].get_input_embeddings().weight, copied)
    last = source.config.num_hidden_layers - 1  # the one layer a 1-layer student copies
    copied_layer = source.state_dict()[f"encoder.layer.{last}.attention.self.query.weight"]
    assert not torch.equal(students[False].state_dict()["encoder.layer.0.attention.self.query.weight"], copied_layer)


def test_text_batches_grouped_by_length_hold_every_row_once_and_pad_less(tiny_teacher, subset, tmp_path):
    from training.distill import _TextTask, _unique_caption_rows, teacher_targets

    targets = teacher_targets(tiny_teacher, subset, tmp_path / "cache", torch.device("cpu"))
    config = distill_config_from_dict({"students": ["text"], "device": "cpu",
                                       "text": {"num_layers": 1, "group_by_length": True, "caption_variants": 1}})
    task = _TextTask(config, targets, torch.device("cpu"))
    rows = task.with_variants(_unique_caption_rows(targets.index, targets.index.rows("train")), targets, seed=0)
    order = np.random.default_rng(0).permutation(rows)
    grouped = task.batch_order(order, 4, np.random.default_rng(1))
    assert sorted(grouped) == sorted(rows)
    lengths = task._lengths(np.arange(len(task.captions)))

    def padded(o):
        return sum(len(o[i:i + 4]) * lengths[o[i:i + 4]].max() for i in range(0, len(o), 4))
    assert padded(grouped) < padded(order)
    assert list(task.batch_order(order, 4, np.random.default_rng(1))) == list(grouped)  # seeded
    plain = _TextTask(distill_config_from_dict({"students": ["text"], "text": {"num_layers": 1}}), targets,
                      torch.device("cpu"))
    assert plain.batch_order(order, 4, np.random.default_rng(1)) is order  # off: as drawn
