"""The image's supply-chain properties, read from compose/Dockerfile (no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "compose" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_every_base_image_is_pinned_to_an_exact_version_or_digest() -> None:
    bases = [args.split()[0] for word, args in _instructions() if word == "FROM"]
    assert bases, "no FROM"
    for image in bases:
        pinned = "@sha256:" in image or re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*", image)
        assert pinned, f"{image} is not pinned to an exact version or digest"


def test_the_image_runs_as_a_fixed_non_root_user() -> None:
    users = [args for word, args in _final_stage() if word == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert user.isdigit() and int(user) >= 1000, "a numeric uid lets runAsNonRoot check it"


def test_the_relay_is_installed_from_the_built_wheel() -> None:
    runs = " ".join(args for word, args in _instructions() if word == "RUN")
    assert re.search(r"pip wheel .*--wheel-dir /wheels", runs), "no wheel is built"
    final = " ".join(args for word, args in _final_stage() if word == "RUN")
    assert re.search(r"pip install [^&]*/wheels/\*\.whl", final), "not installed from the wheel"
    copies = [args for word, args in _final_stage() if word == "COPY"]
    assert all("--from=" in c for c in copies), f"sources copied into the final image: {copies}"


def test_healthcheck_asks_healthz_on_the_address_the_image_listens_on() -> None:
    final = _final_stage()
    checks = [args for word, args in final if word == "HEALTHCHECK"]
    assert len(checks) == 1 and "/healthz" in checks[0]
    port = re.search(r"127\.0\.0\.1:(\d+)/healthz", checks[0])
    assert port is not None
    env = " ".join(args for word, args in final if word == "ENV")
    assert f"CDC_RELAY_HTTP_ADDRESS=0.0.0.0:{port.group(1)}" in env
    assert ("EXPOSE", port.group(1)) in final
    assert ("STOPSIGNAL", "SIGTERM") in final


def test_compose_runs_init_then_run_with_the_images_entrypoint_replaced() -> None:
    relay = yaml.safe_load((REPO / "compose" / "docker-compose.yml").read_text())["services"][
        "relay"
    ]
    assert ("ENTRYPOINT", '["cdc-relay"]') in _final_stage()
    # with ENTRYPOINT cdc-relay, a shell line must replace the entrypoint, not the command
    assert relay["entrypoint"][:2] == ["sh", "-c"] and "command" not in relay
    assert "cdc-relay init && exec cdc-relay run" in relay["entrypoint"][2]
