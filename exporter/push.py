"""Push an export to the Hugging Face Hub: check that the folder is a complete export, upload it in
one commit through huggingface_hub, and say how to load exactly that commit.

The token comes from HF_TOKEN or huggingface_hub's login cache; it is passed to huggingface_hub and
nowhere else (never written, logged or echoed; error text is scrubbed of it). The export folder is
only read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .patch.checkpoint_files import INDEX_FILE, safetensors_header
from .patch.remote.scalpel_patch import code_digest

CARD = "README.md"


class PushError(RuntimeError):
    """The push cannot go on; the message says why and what to do. The local export is untouched."""


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str  # the commit's hash: what `from_pretrained(..., revision=...)` pins
    commit_url: str
    pr_url: Optional[str]
    files: int
    snippet: str


def _safetensors_complete(path: Path) -> Optional[str]:
    """Why a safetensors file is unreadable or truncated (None when its header and size agree)."""
    try:
        header, start = safetensors_header(path)
    except (OSError, ValueError) as e:
        return f"its header cannot be read ({e})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if path.stat().st_size != start + end:
        return (
            f"it holds {path.stat().st_size} bytes where its header describes {start + end} "
            "(truncated?)"
        )
    return None


def _export_config(folder: Path) -> dict:
    """The config.json of an export folder; PushError when it is missing or not an export's."""
    if not folder.is_dir():
        raise PushError(
            f"{folder} is not a folder; give the output folder of `scalpel run` or `scalpel export`"
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise PushError(
            f"{folder} has no config.json, so it is not an export; give the output folder of "
            "`scalpel run` or `scalpel export`"
        ) from None
    except ValueError as e:
        raise PushError(
            f"{folder / 'config.json'} is not valid JSON ({e}); re-export the model"
        ) from None
    if "scalpel_patch" not in config and "scalpel_plain" not in config:
        raise PushError(
            f"{folder} is not a scalpel-exporter export (its config.json has neither scalpel_patch "
            "nor scalpel_plain); push only folders written by `scalpel run` or `scalpel export`"
        )
    return config


def _check_weights(folder: Path) -> None:
    """Every weight file the index names is there and whole."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            raise PushError(f"{index} is not a valid weight index; re-export the model") from None
    else:
        weights = ["model.safetensors"]
    for name in weights:
        if not (folder / name).exists():
            raise PushError(
                f"{folder} lacks the weight file {name} its index names; re-export the model (an "
                "interrupted copy?)"
            )
        why = _safetensors_complete(folder / name)
        if why:
            raise PushError(f"the weight file {name} is damaged: {why}; re-export the model")


def _check_code(folder: Path, config: dict) -> None:
    """The remote-code files auto_map names and those they import are there, as recorded."""
    code = [ref.split(".")[0] + ".py" for ref in config.get("auto_map", {}).values()]
    seen: set[str] = set()
    while code:
        name = code.pop()
        if name in seen:
            continue
        seen.add(name)
        if not (folder / name).exists():
            raise PushError(
                f"{folder} lacks the remote-code file {name} that loading it needs "
                "(trust_remote_code); re-export the model"
            )
        imports = re.findall(r"^\s*from \.(\w+) import", (folder / name).read_text(), re.M)
        code += [m + ".py" for m in imports]
    patch = config.get("scalpel_patch", {})
    recorded = patch.get("code_sha256", {}) if "auto_map" in config else {}
    for name, digest in sorted(recorded.items()):
        if not (folder / name).exists() or code_digest((folder / name).read_text()) != digest:
            raise PushError(
                f"the remote-code file {name} does not match the sha256 its config.json records: "
                "the export was modified after it was written; re-export it rather than push it"
            )


def check_export(folder: Path) -> dict:
    """The export's config.json, after checking that `folder` is a complete export that loads:
    config, every weight file its index names (whole), the remote-code files its auto_map and their
    imports name, the tokenizer and the model card. Raises PushError naming what is missing."""
    folder = Path(folder)
    config = _export_config(folder)
    _check_weights(folder)
    _check_code(folder, config)
    if not (folder / "tokenizer_config.json").exists():
        raise PushError(
            f"{folder} has no tokenizer (tokenizer_config.json); users could not run the model: "
            "re-export it from a model folder that has one"
        )
    if not (folder / CARD).exists():
        raise PushError(
            f"{folder} has no model card ({CARD}); the card reports what was removed and how it "
            "was measured: re-export the model rather than push it without one"
        )
    return config


def loading_snippet(repo_id: str, revision: str, remote_code: bool) -> str:
    trust = ", trust_remote_code=True" if remote_code else ""
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\nmodel = "
        f"AutoModelForCausalLM.from_pretrained({repo_id!r}, "
        f"revision={revision!r}{trust})\ntokenizer = AutoTokenizer.from_pretrained({repo_id!r}, "
        f"revision={revision!r})"
    )


def _default_message(config: dict) -> str:
    if "scalpel_plain" in config:
        return (
            "Upload plain export (SAE directions projected out through layer "
            f"{config['scalpel_plain']['layer']})"
        )
    block = config["scalpel_patch"]
    return (
        f"Upload patched checkpoint ({block.get('mode', 'patch')} patch at layer "
        f"{block.get('layer')})"
    )


def _explain(e: BaseException, repo_id: str, endpoint: str) -> str:
    """One message per failure the user can act on."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, OfflineModeIsEnabled):
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE is set); unset it to push"
    if isinstance(e, RevisionNotFoundError):
        return f"{repo_id} has no revision to push to ({e.__class__.__name__}); check --revision"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return (
            f"the Hub at {endpoint} rejected the token (401): it is invalid or expired; set a "
            "valid write token in HF_TOKEN or run `hf auth login`"
        )
    if status == 403:
        return (
            f"the token may not write to {repo_id} (403): the repository or its namespace belongs "
            "to someone else, or the token is read-only; push to a namespace you own or use a "
            "write token"
        )
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        return (
            f"{repo_id} was not found on {endpoint} (404) and could not be created; check the repo "
            "id"
        )
    if isinstance(e, HfHubHTTPError):
        return f"the Hub at {endpoint} refused the upload (HTTP {status}); try again later"
    # The HTTP client is huggingface_hub's choice (httpx, httpx2...): its errors are told apart by
    # class name.
    kinds = {c.__name__ for c in type(e).__mro__}
    if kinds & {"ConnectError", "ConnectTimeout"}:
        return (
            f"cannot reach the Hub at {endpoint} (network down or wrong HF_ENDPOINT); nothing was "
            "uploaded"
        )
    if kinds & {"TransportError", "NetworkError", "ConnectionError", "TimeoutError"}:
        return (
            f"the upload to {endpoint} was interrupted ({type(e).__name__}); the commit may not "
            "have been made. Re-run the same command: files already on the Hub are not sent twice"
        )
    return f"the push failed ({type(e).__name__}: {e})"


def push_export(
    folder: Path,
    repo_id: str,
    *,
    private: bool = True,
    revision: Optional[str] = None,
    create_pr: bool = False,
    commit_message: Optional[str] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    log: Callable[[str], object] = print,
) -> PushResult:
    """Create `repo_id` if needed (private unless `private` is False; an existing repo keeps its
    visibility), create branch `revision` if needed, and upload `folder` in one commit (or a pull
    request)."""
    import huggingface_hub
    from huggingface_hub import HfApi

    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo_id or ""):
        raise PushError(
            f"repo id {repo_id!r} is not OWNER/NAME; give e.g. --repo-id my-org/my-model-scrubbed"
        )
    if create_pr and revision not in (None, "main"):
        raise PushError(
            "a pull request is opened against main: give --create-pr or --revision, not both"
        )
    folder = Path(folder)
    config = check_export(folder)
    token = token or huggingface_hub.get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a write token)"
        )
    api = HfApi(endpoint=endpoint, token=token)
    endpoint = api.endpoint
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        log(
            f"uploading {files} files from {folder} to {repo_id}"
            + (f" ({revision})" if revision else "")
        )
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message or _default_message(config),
            create_pr=create_pr,
        )
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message, scrubbed of the token
        raise PushError(_explain(e, repo_id, endpoint).replace(token, "<token>")) from None
    snippet = loading_snippet(repo_id, info.oid, remote_code="auto_map" in config)
    return PushResult(repo_id, info.oid, info.commit_url, info.pr_url, files, snippet)
