"""Secrets are never written: which config keys are secret, and redacting them from every written copy.

A key is split into words at ``_``, ``-``, ``.``, spaces and camelCase humps, then lower-cased
(``aws_secret_access_key`` -> aws secret access key, ``hubToken`` -> hub token). It is secret when

- any word is ``secret(s)``, ``password(s)``, ``passwd``, ``passphrase`` or ``credential(s)``, or a run-together
  form such as ``apikey``, ``accesskey``, ``authtoken`` (``client_secret``, ``db-password``, ``credentials_file``);
- the last word is ``key`` (``api_key``, ``access-key``, ``private_key``, ``aws_secret_access_key``), unless the
  word before names attention or a lookup (``share_att_key``, ``sort_key``);
- the last word is ``token`` (``hub_token``, ``access-token``, ``HF_TOKEN``, ``token``), unless the word before
  names a tokenizer's special token or a rate (``eos_token``, ``pad_token``, ``num_experts_per_token``).

Not secret: ``tokenizer``, ``tokens_per_set``, ``max_tokens``, ``eos_token_id`` (last word ``id``),
``num_key_value_heads`` (``key`` is not the last word), ``vocab``. The rule matches words, never substrings.
Class names in a model config's ``id2label`` / ``label2id`` are data and left alone. No field of any config
class in transformers 5.23 is secret under this rule (checked over ``CONFIG_MAPPING``).

Redaction replaces the value with ``<redacted>`` in the *written* copies only (config.yaml, checkpoints' config,
W&B's config and recorded command line, exported config.json); the model is built from the real values.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlsplit

REDACTED = "<redacted>"

_ANYWHERE = {"secret", "secrets", "password", "passwords", "passwd", "passphrase", "credential", "credentials",
             "apikey", "apikeys", "accesskey", "secretkey", "privatekey", "authtoken", "accesstoken", "apitoken",
             "hubtoken", "hftoken", "bearertoken", "refreshtoken"}
# <word>_token names a tokenizer's special token or a rate (experts_per_token), not a credential
_NOT_TOKEN = {"eos", "bos", "pad", "unk", "sep", "cls", "class", "mask", "start", "end", "image", "audio", "video",
              "boi", "eoi", "boa", "eoa", "special", "additional", "added", "new", "fim", "prefix", "suffix",
              "middle", "think", "tool", "system", "user", "assistant", "per", "first", "last", "next"}
# <word>_key names a part of attention (share_att_key) or a lookup, not a credential
_NOT_KEY = {"att", "attn", "attention", "qk", "kv", "query", "sort", "dict", "cache", "primary", "foreign", "group"}
# label maps of a model config hold class names (e.g. "B-secret"), which are data, not keys
_LABEL_MAPS = {"id2label", "label2id"}


def key_words(name: str) -> list[str]:
    """``"awsSecret-access_KEY"`` -> ``["aws", "secret", "access", "key"]``."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(name))
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", spaced)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(name: Any) -> bool:
    """Whether a config key names a secret (see the module doc for the rule)."""
    words = key_words(str(name))
    if not words:
        return False
    if any(w in _ANYWHERE for w in words):
        return True
    if words[-1] == "key":
        return len(words) == 1 or words[-2] not in _NOT_KEY
    if words[-1] == "token":
        return len(words) == 1 or words[-2] not in _NOT_TOKEN
    return False


_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*:[^/?#@]*@")
# query parameters of signed URLs (S3/GCS presigned, Azure SAS) besides secret-named ones (token, api_key, ...)
_SIGNED = {"sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature",
           "x-goog-credential"}
URL_CREDENTIALS_HINT = ("give credentials through the environment, not the path: s3 AWS_* variables or a profile, gcs "
                        "GOOGLE_APPLICATION_CREDENTIALS, hf HF_TOKEN, http(s) FSSPEC_HTTP='{\"headers\": {\"Authorization\": "
                        "\"Bearer ...\"}}' (fsspec's configuration)")


_URL_USER = re.compile(r"^https?://([^/?#@:]+)@", re.IGNORECASE)
# prefixes of access tokens that services accept as an http(s) URL's user name (Hugging Face, GitHub, GitLab, Slack)
_TOKEN_PREFIXES = ("hf_", "ghp_", "gho_", "ghs_", "ghu_", "github_pat_", "glpat-", "xox")


def _looks_like_token(user: str) -> bool:
    """An http(s) URL's user name that is an access token (`https://TOKEN@host/...`, as git and Hugging Face accept
    it): a known token prefix, or 20+ characters mixing letters and digits with no separator a person's name has."""
    if user.lower().startswith(_TOKEN_PREFIXES):
        return True
    return (len(user) >= 20 and any(c.isdigit() for c in user) and any(c.isalpha() for c in user)
            and not any(c in user for c in ".%+ "))


def url_credentials(value: str) -> str | None:
    """What in a URL is a credential (a password in ``user:password@``, an access token as an http(s) user name, a
    token or signature query parameter), or None.
    A path field or `cpt prepare` input holding one is refused: it would be written to config.yaml, checkpoints, W&B,
    manifests and logs, which redact secret-named keys, not parts of values."""
    if "://" not in str(value):
        return None
    if _URL_PASSWORD.match(value):
        return "a password (user:password@)"
    user = _URL_USER.match(value)
    if user and _looks_like_token(user.group(1)):
        return "a token as the user name (TOKEN@)"
    secret = [k for k, _ in parse_qsl(urlsplit(value).query, keep_blank_values=True)
              if is_secret_key(k) or k.lower() in _SIGNED]
    return f"the query parameter {secret[0]!r}" if secret else None


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with the value of every secret-named key, at any depth, replaced by ``<redacted>``."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) else v if k in _LABEL_MAPS else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def redact_override(item: str) -> str:
    """A ``KEY=VALUE`` override with the value redacted when it holds a secret (a secret key, or a mapping
    value with secret keys inside)."""
    if "=" not in item:
        return item
    key, value = item.split("=", 1)
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    parts = key.strip().split(".")
    if any(is_secret_key(p) for p in parts) or redact(parsed) != parsed:
        return f"{key}={REDACTED}"
    return item


def redact_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """An experiment spec (``cpt experiment``) with secrets redacted, in its ``--set``-style override lists too."""
    out = redact(spec)
    if isinstance(out.get("run_overrides"), list):
        out["run_overrides"] = [redact_override(o) for o in out["run_overrides"]]
    for v in out.get("variants") or []:
        if isinstance(v, dict) and isinstance(v.get("overrides"), list):
            v["overrides"] = [redact_override(o) for o in v["overrides"]]
    return out


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with the values of secret ``--set KEY=VALUE`` overrides redacted."""
    out, after_set = [], False
    for a in argv:
        if after_set:
            out.append(redact_override(a))
        elif a.startswith("--set="):
            out.append("--set=" + redact_override(a[len("--set="):]))
        else:
            out.append(a)
        after_set = a == "--set"
    return out


@contextlib.contextmanager
def redacted_argv() -> Iterator[None]:
    """``sys.argv`` with secrets redacted while the block runs (W&B records the command line at ``wandb.init``)."""
    saved = list(sys.argv)
    sys.argv[:] = redact_argv(saved)
    try:
        yield
    finally:
        sys.argv[:] = saved


def redact_json_file(path: str | os.PathLike) -> bool:
    """Rewrite a JSON file (e.g. an exported config.json) with its secret-named keys redacted. Returns whether
    anything changed; the file is untouched when nothing is secret."""
    p = Path(path)
    data = json.loads(p.read_text())
    clean = redact(data)
    if clean == data:
        return False
    p.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return True
