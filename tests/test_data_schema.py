"""The dataset format: chat JSONL and LLaVA JSON load to the same Samples; every bad row is reported."""

import json

import pytest
from PIL import Image

from vlmkit.data.schema import Sample, load_samples, parse_messages, read_samples
from vlmkit.errors import VlmkitError

USER_IMG = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
ANSWER = {"role": "assistant", "content": "A red square."}


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "imgs" / name)
    return tmp_path


def _write_jsonl(path, rows):
    """Rows are objects (dumped) or raw strings (written as they are, for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _problem_lines(problems, path):
    """{line: problem} keyed by the line number each problem names, checking its FILE: prefix."""
    out = {}
    for p in problems:
        assert "\n" not in p
        assert p.startswith(f"{path}:"), p
        out.setdefault(int(p[len(str(path)) + 1 :].split(":")[0]), []).append(p)
    return out


def test_chat_jsonl_loads_and_normalises(data_dir):
    path = _write_jsonl(
        data_dir / "train.jsonl",
        [
            {"messages": [{"role": "system", "content": "Be brief."}, USER_IMG, ANSWER], "images": ["imgs/a.png"]},
            "",  # blank lines are skipped but still counted
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        ],
    )
    samples = load_samples(path)
    assert [s.line for s in samples] == [1, 3]
    s = samples[0]
    assert isinstance(s, Sample) and s.source == str(path) and s.where == f"{path}:1"
    assert s.images == ((data_dir / "imgs" / "a.png").resolve(),) and s.n_images == 1
    assert s.images[0].is_absolute()
    assert s.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert s.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert s.messages[2]["content"] == [{"type": "text", "text": "A red square."}]
    assert samples[1].n_images == 0


def test_image_parts_with_own_paths_keep_part_order(data_dir):
    user = {
        "role": "user",
        "content": [
            {"type": "image", "image": "imgs/b.png"},
            {"type": "text", "text": "and"},
            {"type": "image", "path": "imgs/a.png"},
        ],
    }
    path = _write_jsonl(data_dir / "d.jsonl", [{"messages": [user, ANSWER]}])
    (s,) = load_samples(path)
    assert [p.name for p in s.images] == ["b.png", "a.png"]
    assert s.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]


def test_hf_style_single_image_key(data_dir):
    path = _write_jsonl(data_dir / "d.jsonl", [{"messages": [USER_IMG, ANSWER], "image": "imgs/b.png"}])
    (s,) = load_samples(path)
    assert s.images[0].name == "b.png"


def test_image_root_overrides_the_data_folder(data_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere")
    path = _write_jsonl(other / "d.jsonl", [{"messages": [USER_IMG, ANSWER], "images": ["a.png"]}])
    _, problems = read_samples(path)
    assert len(problems) == 1 and "a.png" in problems[0] and "not found" in problems[0]
    (s,) = load_samples(path, image_root=data_dir / "imgs")
    assert s.images[0] == (data_dir / "imgs" / "a.png").resolve()


def test_every_malformed_row_is_reported_with_its_line(data_dir):
    good = {"messages": [USER_IMG, ANSWER], "images": ["imgs/a.png"]}
    rows = [
        good,  # 1
        '{"messages": [',  # 2 invalid JSON
        "[1, 2]",  # 3 not an object
        {"images": []},  # 4 missing messages
        {"messages": []},  # 5 empty messages
        {"messages": [USER_IMG, {"role": "bot", "content": "x"}], "images": ["imgs/a.png"]},  # 6 bad role
        {"messages": [{"role": "user", "content": [{"type": "video"}]}, ANSWER]},  # 7 bad part type
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}, ANSWER]},  # 8 text not str
        {"messages": [USER_IMG, ANSWER], "images": ["imgs/a.png", "imgs/b.png"]},  # 9 count mismatch
        {"messages": [USER_IMG, ANSWER], "images": ["imgs/missing.png"]},  # 10 image not on disk
        {"messages": [USER_IMG], "images": ["imgs/a.png"]},  # 11 no assistant
        good,  # 12
    ]
    path = _write_jsonl(data_dir / "bad.jsonl", rows)
    samples, problems = read_samples(path)
    assert [s.line for s in samples] == [1, 12]
    by_line = _problem_lines(problems, path)
    assert sorted(by_line) == list(range(2, 12))
    assert all(len(v) == 1 for v in by_line.values()), problems
    expect = {
        2: "invalid JSON",
        3: "expected a JSON object, got a list",
        4: "field `messages`: missing",
        5: "field `messages`: is empty",
        6: "field `messages[1].role`: 'bot' is not one of system/user/assistant",
        7: "field `messages[0].content[0].type`: 'video' is not a supported part type",
        8: "field `messages[0].content[0].text`: expected a string, got a number",
        9: "field `images`: 2 image(s) listed but 1",
        10: "field `images[0]`: image",
        11: "has no assistant message",
    }
    for line, text in expect.items():
        assert text in by_line[line][0], by_line[line][0]
        assert ";" in by_line[line][0]  # every problem says what to do after the semicolon
    assert "missing.png" in by_line[10][0]


def test_load_samples_raises_first_problem_and_count(data_dir):
    path = _write_jsonl(data_dir / "bad.jsonl", ["nope", {"messages": []}, {"messages": 3}])
    with pytest.raises(VlmkitError) as e:
        load_samples(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:1: invalid JSON")
    assert msg.endswith(f"(and 2 more problems; run `vlmkit data check {path}` to see them all)")


def test_check_images_decodes_each_image(data_dir):
    full = (data_dir / "imgs" / "a.png").read_bytes()
    (data_dir / "imgs" / "cut.png").write_bytes(full[: len(full) // 2])
    path = _write_jsonl(data_dir / "d.jsonl", [{"messages": [USER_IMG, ANSWER], "images": ["imgs/cut.png"]}])
    assert read_samples(path)[1] == []  # the file exists; only decoding finds the damage
    samples, problems = read_samples(path, check_images=True)
    assert samples == [] and len(problems) == 1
    assert problems[0].startswith(f"{path}:1: field `images[0]`: ") and "cut.png" in problems[0]


@pytest.mark.parametrize(
    "name, content, expect",
    [
        ("empty.jsonl", "", "no samples"),
        ("blank.jsonl", "\n\n", "no samples"),
        ("data.csv", "a,b\n", "unsupported extension '.csv'"),
        ("broken.json", '[{"conversations": []},\n  {', "broken.json:2: invalid JSON"),
        ("obj.json", '{"data": []}', "expected a JSON list of samples"),
    ],
)
def test_file_level_problems(tmp_path, name, content, expect):
    (tmp_path / name).write_text(content)
    samples, problems = read_samples(tmp_path / name)
    assert samples == [] and len(problems) == 1
    assert problems[0].startswith(str(tmp_path / name)) and expect in problems[0]
    with pytest.raises(VlmkitError, match="vlmkit|" + name):
        load_samples(tmp_path / name)


def test_missing_file_and_folder(tmp_path):
    assert "not found" in read_samples(tmp_path / "nope.jsonl")[1][0]
    assert "folder" in read_samples(tmp_path)[1][0]
    with pytest.raises(VlmkitError, match="nope.jsonl"):
        load_samples(tmp_path / "nope.jsonl")


def test_url_image_is_refused(data_dir):
    path = _write_jsonl(data_dir / "d.jsonl", [{"messages": [USER_IMG, ANSWER], "images": ["https://x/y.png"]}])
    assert "URL" in read_samples(path)[1][0]


# ------------------------------------------------------------------------------------- LLaVA style


def _llava(image, *values):
    turns = [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]
    row = {"id": "x", "conversations": turns}
    if image is not None:
        row["image"] = image
    return row


def test_llava_json_markers_become_image_parts_in_place(data_dir):
    rows = [
        _llava("a.png", "<image>\nWhat colour?", "Red."),
        _llava("a.png", "Look: <image> what is it?", "A square.", "Sure?", "Yes."),
        _llava(["a.png", "b.png"], "Compare <image> and <image>", "Different."),
        _llava(None, "Just text", "Fine."),
    ]
    path = data_dir / "imgs" / "llava.json"
    path.write_text(json.dumps(rows))
    s1, s2, s3, s4 = load_samples(path)
    assert [s.line for s in (s1, s2, s3, s4)] == [1, 2, 3, 4]
    assert s1.messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
    ]
    assert s2.messages[0]["content"] == [
        {"type": "text", "text": "Look: "},
        {"type": "image"},
        {"type": "text", "text": " what is it?"},
    ]
    assert [m["role"] for m in s2.messages] == ["user", "assistant", "user", "assistant"]
    assert [p.name for p in s3.images] == ["a.png", "b.png"]
    assert [p["type"] for p in s3.messages[0]["content"]] == ["text", "image", "text", "image"]
    assert s4.n_images == 0 and s4.messages[0]["content"] == [{"type": "text", "text": "Just text"}]


def test_llava_image_without_marker_goes_first_in_first_user_message(data_dir):
    row = {
        "image": "a.png",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What colour?"},
            {"from": "gpt", "value": "Red."},
        ],
    }
    path = data_dir / "imgs" / "l.json"
    path.write_text(json.dumps([row]))
    (s,) = load_samples(path)
    assert s.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert s.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "What colour?"}]


def test_llava_rows_in_jsonl_and_their_problems(data_dir):
    rows = [
        _llava("imgs/a.png", "<image>\nWhat?", "Red."),  # 1 fine
        _llava("imgs/a.png", "<image> <image> two?", "No."),  # 2 markers != images
        {"image": "imgs/a.png", "conversations": [{"from": "robot", "value": "hi"}]},  # 3 bad from
        _llava("imgs/a.png", "<image>\nOnly a question"),  # 4 no assistant
    ]
    path = _write_jsonl(data_dir / "l.jsonl", rows)
    samples, problems = read_samples(path)
    assert [s.line for s in samples] == [1]
    by_line = _problem_lines(problems, path)
    assert sorted(by_line) == [2, 3, 4]
    assert "1 image(s) but 2 `<image>` marker(s)" in by_line[2][0]
    assert "field `conversations[0].from`: 'robot' is not one of human/gpt/system" in by_line[3][0]
    assert "no assistant message" in by_line[4][0]


def test_pretty_printed_list_in_a_jsonl_file_still_loads(data_dir):
    path = data_dir / "pretty.jsonl"
    path.write_text(json.dumps([{"messages": [USER_IMG, ANSWER], "images": ["imgs/a.png"]}], indent=2))
    assert load_samples(path)[0].n_images == 1


# ------------------------------------------------------------------------------------- parse_messages


def test_parse_messages_bare_list_for_the_cli(data_dir):
    msgs = [{"role": "user", "content": [{"type": "image", "image": "imgs/a.png"}, {"type": "text", "text": "?"}]}]
    messages, images = parse_messages(msgs, data_dir)
    assert images == [(data_dir / "imgs" / "a.png").resolve()]
    assert messages == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    assert msgs[0]["content"][0] == {"type": "image", "image": "imgs/a.png"}  # the input is not modified


def test_parse_messages_raises_one_line_naming_the_source(data_dir):
    msgs = [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]}, {"role": "bot", "content": "x"}]
    with pytest.raises(VlmkitError) as e:
        parse_messages(msgs, data_dir, where="msgs.json")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("msgs.json: field `messages[1].role`") and "1 more problem" in msg
    with pytest.raises(VlmkitError, match=r"msgs.json: field `messages\[0\].content\[0\].image`: image .*gone.png"):
        parse_messages(msgs[:1], data_dir, where="msgs.json")
