"""`scalpel push`: a real export of a tiny model pushed to a Hub-compatible server on 127.0.0.1,
loaded back from it in a fresh process, and every failure with one clear message and the local
export untouched."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from helpers.hub_server import HubServer

from exporter.models import LoadedModel, architecture_of
from exporter.patch import build_patch
from exporter.patch.export import write_export
from exporter.push import PushError, push_export
from exporter.sae import TopKSAE

TOKEN = "hf_aliceWriteToken0123456789"
CARD = (
    "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny model with its memorised "
    "PII removed\n"
)


@pytest.fixture
def hub():
    server = HubServer(tokens={TOKEN: "alice", "hf_bobToken": "bob"}).start()
    yield server
    server.stop()


@pytest.fixture
def export(tmp_path, tiny_tokenizer) -> Path:
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    torch.manual_seed(0)
    sae = TopKSAE(32, 64, 4)
    patch = build_patch(sae, [1, 5, 9], torch.randn(32) * 0.1, mode="exact")
    loaded = LoadedModel(model, tiny_tokenizer, architecture_of(model), "tiny", None)
    return write_export(loaded, patch, 1, tmp_path / "export", files={"README.md": CARD})


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + (p.read_bytes() if p.is_file() else b"/"))
    return h.hexdigest()


def _env(hub: HubServer, home: Path, token=TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def test_push_then_load_from_the_server_in_a_fresh_process(hub, export, tmp_path):
    before = _digest(export)
    proc = subprocess.run(
        [sys.executable, "-m", "exporter", "push", str(export), "--repo-id", "alice/tiny-scrubbed"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(hub, tmp_path / "hf-push"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    revision = re.search(r"revision: ([0-9a-f]{40})", proc.stdout).group(1)
    assert f"{hub.url}/alice/tiny-scrubbed/commit/{revision}" in proc.stdout
    assert f"revision='{revision}', trust_remote_code=True" in proc.stdout  # the snippet, pinned
    repo = hub.repos["alice/tiny-scrubbed"]
    assert repo.private and repo.refs["main"] == revision
    local = {str(p.relative_to(export)): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    assert {k: v for k, v in repo.commits[revision].items() if k != ".gitattributes"} == local
    assert _digest(export) == before  # the push only reads the folder
    # The token travels only in the Authorization header: never printed, never written.
    assert TOKEN not in proc.stdout + proc.stderr
    assert not [
        p
        for p in (tmp_path / "hf-push").rglob("*")
        if p.is_file() and TOKEN.encode() in p.read_bytes()
    ]

    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\nids = "
        "torch.load(sys.argv[1])\nhub = "
        "AutoModelForCausalLM.from_pretrained('alice/tiny-scrubbed', revision=sys.argv[2], "
        "trust_remote_code=True).eval()\nlocal = AutoModelForCausalLM.from_pretrained(sys.argv[3], "
        "trust_remote_code=True).eval()\nwith torch.no_grad():\n    torch.save({'hub': "
        "hub(ids).logits, 'local': local(ids).logits, 'cls': type(hub).__name__}, sys.argv[4])\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp_path / "ids.pt"),
            revision,
            str(export),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(hub, tmp_path / "hf-load"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "logits.pt")
    assert out["cls"] == "ScalpelForCausalLM"
    torch.testing.assert_close(out["hub"], out["local"], rtol=0, atol=0)
    resolved = [path for method, path, _ in hub.requests if "/resolve/" in path]
    # downloaded from the pinned commit
    assert resolved and all(f"/resolve/{revision}/" in p for p in resolved)


def test_push_to_a_branch_and_as_a_pull_request_leaves_main_alone(hub, export):
    first = push_export(export, "alice/tiny", token=TOKEN, endpoint=hub.url, log=lambda m: None)
    main = hub.repos["alice/tiny"].refs["main"]
    assert first.revision == main
    branch = push_export(
        export,
        "alice/tiny",
        revision="scrubbed-v2",
        commit_message="Scrubbed again",
        token=TOKEN,
        endpoint=hub.url,
        log=lambda m: None,
    )
    assert hub.repos["alice/tiny"].refs["scrubbed-v2"] == branch.revision
    pr = push_export(
        export, "alice/tiny", create_pr=True, token=TOKEN, endpoint=hub.url, log=lambda m: None
    )
    assert (
        pr.pr_url.endswith("/alice/tiny/discussions/1")
        and hub.repos["alice/tiny"].refs["refs/pr/1"] == pr.revision
    )
    assert hub.repos["alice/tiny"].refs["main"] == main
    assert f"revision={pr.revision!r}" in pr.snippet
    with pytest.raises(PushError, match="not both"):
        push_export(
            export,
            "alice/tiny",
            create_pr=True,
            revision="scrubbed-v2",
            token=TOKEN,
            endpoint=hub.url,
        )


@pytest.mark.parametrize(
    "case, message",
    [
        ("no token", "no Hugging Face token: set HF_TOKEN"),
        ("bad token", "rejected the token (401)"),
        ("someone else's repo", "may not write to bob/their-model (403)"),
        ("someone else's namespace", "may not write to bob/new-model (403)"),
        ("network down", "cannot reach the Hub"),
        ("dropped mid-upload", "was interrupted"),
    ],
)
def test_push_failures_say_what_happened_and_keep_the_export(
    hub, export, monkeypatch, case, message
):
    import huggingface_hub

    hub.add_repo("bob/their-model", "bob", {"config.json": b"{}"})
    repo, token, endpoint = "alice/tiny", TOKEN, hub.url
    if case == "no token":
        token = None
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    elif case == "bad token":
        token = "hf_notAValidToken"
    elif case == "someone else's repo":
        repo = "bob/their-model"
    elif case == "someone else's namespace":
        repo = "bob/new-model"
    elif case == "network down":
        from conftest import free_port

        endpoint = f"http://127.0.0.1:{free_port()}"
    elif case == "dropped mid-upload":
        hub.fail = "commit"
        # huggingface_hub retries a dropped request with back-off (1 + 2 + 4 + 8 s); the retries
        # still run, without the waits
        waits = []
        monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", waits.append)
    before = _digest(export)
    with pytest.raises(PushError, match=re.escape(message)) as info:
        push_export(export, repo, token=token, endpoint=endpoint, log=lambda m: None)
    assert TOKEN not in str(info.value)
    assert _digest(export) == before
    assert hub.repos["bob/their-model"].refs["main"] == hub.repos["bob/their-model"].resolve("main")
    # nothing committed to someone else's repo
    assert len(hub.repos["bob/their-model"].commits) == 1
    if case == "dropped mid-upload":
        assert len(hub.repos["alice/tiny"].commits) == 1  # the repo was created; no commit landed
        assert waits, "the dropped upload was not retried"


def _break(folder: Path, case: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    if case == "not an export":
        config.pop("scalpel_patch")
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "no card":
        (folder / "README.md").unlink()
    elif case == "no remote code":
        (folder / "scalpel_patch.py").unlink()
    elif case == "truncated weights":
        path = folder / "scalpel_patch.safetensors"
        path.write_bytes(path.read_bytes()[:-16])
    elif case == "missing shard":
        (folder / "model-base.safetensors").unlink()
    elif case == "no tokenizer":
        (folder / "tokenizer_config.json").unlink()
    elif case == "bad config":
        (folder / "config.json").write_text("{not json")
    elif case == "edited remote code":
        with open(folder / "modeling_scalpel.py", "a") as f:
            f.write("\n# edited\n")


@pytest.mark.parametrize(
    "case, message",
    [
        ("not an export", "not a scalpel-exporter export"),
        ("no card", "no model card (README.md)"),
        ("no remote code", "lacks the remote-code file scalpel_patch.py"),
        ("truncated weights", "scalpel_patch.safetensors is damaged"),
        ("missing shard", "lacks the weight file model-base.safetensors"),
        ("no tokenizer", "no tokenizer"),
        ("bad config", "is not valid JSON"),
        ("edited remote code", "modeling_scalpel.py does not match the sha256"),
    ],
)
def test_push_refuses_an_incomplete_export_before_sending_anything(hub, export, case, message):
    _break(export, case)
    with pytest.raises(PushError, match=re.escape(message)):
        push_export(export, "alice/tiny", token=TOKEN, endpoint=hub.url, log=lambda m: None)
    assert hub.requests == [] and hub.repos == {}


def test_push_refuses_a_malformed_repo_id_and_a_missing_folder(tmp_path, export):
    with pytest.raises(PushError, match="not OWNER/NAME"):
        push_export(
            export, "just-a-name", token=TOKEN, endpoint="http://127.0.0.1:9", log=lambda m: None
        )
    with pytest.raises(PushError, match="is not a folder"):
        push_export(
            tmp_path / "nope",
            "alice/tiny",
            token=TOKEN,
            endpoint="http://127.0.0.1:9",
            log=lambda m: None,
        )
