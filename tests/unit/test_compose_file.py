"""`docker-compose.yml`, `Dockerfile` and `.dockerignore` checked without a Docker
engine: the compose file against the Compose Specification JSON schema (what
`docker compose config` validates), and the deployment rules shardwire relies
on: one image, TP groups whose ranks agree, shard ports on the internal network
only, health checks with our probe, and commands the CLI accepts."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from serve.cli import build_parser
from tests.fixtures.compose import (
    DOCKERIGNORE,
    ComposeError,
    compose_schema,
    dockerfile_entrypoint,
    dockerfile_instructions,
    interpolate,
    load_compose,
    parse_duration,
    services,
    start_order,
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _errors(validator: jsonschema.protocols.Validator, document: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_the_file_matches_the_compose_schema(compose: dict, validator) -> None:
    assert _errors(validator, compose) == []
    # With variables set, as a user would: still valid, and the values land.
    env = {"SHARDWIRE_MODEL": "/models/Qwen2-0.5B-Instruct", "SHARDWIRE_PORT": "6000"}
    custom = load_compose(env=env)
    assert _errors(validator, custom) == []
    assert custom["services"]["gateway"]["ports"][0] == "6000:50051"
    assert (
        custom["services"]["shard-b1"]["environment"]["SHARDWIRE_MODEL"] == env["SHARDWIRE_MODEL"]
    )


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["services"]["gateway"]["healthcheck"].update(intervall="1s"),
        lambda c: c["services"]["shard-a0"].update(depends_on={"shard-a1": {"conditon": "x"}}),
        lambda c: c["services"]["shard-a1"].update(restart=["on-failure"]),
        lambda c: c.update(servics={}),
    ],
    ids=["healthcheck-key", "depends-on-key", "restart-type", "top-level-key"],
)
def test_the_schema_rejects_what_compose_rejects(compose: dict, validator, break_it) -> None:
    broken = copy.deepcopy(compose)
    break_it(broken)
    assert _errors(validator, broken)


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}/${UNSET:-d}/${EMPTY:-d}/${EMPTY-d}/$$SET/$SET", env) == (
        "x/d/d//$SET/x"
    )
    with pytest.raises(ComposeError, match="required"):
        interpolate("${UNSET:?set it}", env)
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("500ms") == 0.5
    with pytest.raises(ComposeError):
        parse_duration("5 seconds")


def test_one_image_for_every_role(compose: dict) -> None:
    images = {svc["image"] for svc in compose["services"].values()}
    assert images == {"shardwire:latest"}
    assert all(svc["build"]["context"] == "." for svc in compose["services"].values())
    assert dockerfile_entrypoint() == ["shardwire"]


def test_dockerfile_runs_as_a_user_with_the_model_volume() -> None:
    steps = dockerfile_instructions()
    words = [w for w, _ in steps]
    assert words[0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")
    assert ("FROM", "${BASE_IMAGE}") in steps
    users = [args for w, args in steps if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("VOLUME", '["/models"]') in steps
    runs = [args for w, args in steps if w == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==" in r)
    package_step = next(i for i, r in enumerate(runs) if 'pip install ".[server]"' in r)
    assert torch_step < package_step, "torch comes from its wheel index before the package"
    assert "--index-url" in runs[torch_step]
    kept = DOCKERIGNORE.read_text().split()
    for needed in ("!pyproject.toml", "!README.md", "!protos/", "!clients/", "!serve/"):
        assert needed in kept
    # Every file the image copies is let through the build context.
    for word, args in steps:
        if word == "COPY":
            for source in args.split()[:-1]:
                assert f"!{source}" in kept or f"!{source}/" in kept, source


def _flag(argv: tuple[str, ...], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_tp_groups_are_whole_and_consistent(compose: dict) -> None:
    by_name = services(compose)
    shards = {n: s for n, s in by_name.items() if s.argv[1] == "shard"}
    groups: dict[str, dict[int, str]] = {}
    for name, svc in shards.items():
        env = svc.environment
        groups.setdefault(env["MASTER_ADDR"], {})[int(env["RANK"])] = name
    assert len(groups) == 2, "two replicas"
    for leader, ranks in groups.items():
        assert ranks[0] == leader, "MASTER_ADDR is rank 0's service name"
        sizes = {int(by_name[n].environment["WORLD_SIZE"]) for n in ranks.values()}
        assert sizes == {len(ranks)} and sorted(ranks) == list(range(len(ranks)))
        ports = {by_name[n].environment["MASTER_PORT"] for n in ranks.values()}
        assert len(ports) == 1
        codecs = {by_name[n].environment["SHARDWIRE_COMM_CODEC"] for n in ranks.values()}
        assert len(codecs) == 1, "every rank of a group uses one codec"


def test_shard_ports_stay_on_the_internal_network(compose: dict) -> None:
    by_name = services(compose)
    internal = {n for n, cfg in compose["networks"].items() if (cfg or {}).get("internal")}
    assert internal
    for name, svc in by_name.items():
        published = {p.rsplit(":", 1)[-1] for p in svc.ports}
        if svc.argv[1] == "gateway":
            assert published == {_flag(svc.argv, "--port"), _flag(svc.argv, "--metrics-port")}
            continue
        # A shard publishes at most its metrics port; its first interface (eth0,
        # where GLOO_SOCKET_IFNAME points) is on the internal network.
        assert published <= {_flag(svc.argv, "--metrics-port")}, name
        assert svc.networks[0] in internal, name
        assert svc.environment.get("GLOO_SOCKET_IFNAME") == "eth0"
        if svc.environment["RANK"] != "0":
            assert set(svc.networks) <= internal, name
            assert not svc.ports


def test_gateway_reaches_every_leader_and_waits_for_its_health(compose: dict) -> None:
    by_name = services(compose)
    gateway = by_name["gateway"]
    leaders = {
        n for n, s in by_name.items() if s.argv[1] == "shard" and s.environment["RANK"] == "0"
    }
    replicas = gateway.environment["SHARDWIRE_REPLICAS"].split(",")
    assert {r.split(":")[0] for r in replicas} == leaders
    for replica in replicas:
        name, port = replica.split(":")
        leader = by_name[name]
        assert _flag(leader.argv, "--port") == port
        assert set(leader.networks) & set(gateway.networks), "a shared network"
        assert gateway.depends_on[name] == "service_healthy"
        check = leader.healthcheck
        assert check is not None and check.argv[:2] == ("shardwire", "probe")
        assert _flag(check.argv, "--target") == f"127.0.0.1:{port}"
        assert check.interval_s <= 10 and (check.start_interval_s or 0) <= 2
    assert gateway.healthcheck is not None and gateway.healthcheck.argv[:2] == (
        "shardwire",
        "probe",
    )
    # Rank 1 may start first: the leader's rendezvous waits for it; `down` stops leaders first.
    order = start_order(by_name)
    for leader in leaders:
        assert order.index(leader) < order.index("gateway")


def test_restart_policy_and_signals(compose: dict) -> None:
    drain = parse_duration("30s")
    for name, svc in compose["services"].items():
        assert svc["restart"] in ("on-failure", "unless-stopped", "always"), name
        assert svc["init"] is True, f"{name}: PID 1 must pass SIGTERM on"
        assert parse_duration(svc["stop_grace_period"]) > drain, name


def test_every_command_parses(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    by_name = services(compose)
    for svc in by_name.values():
        for key, value in svc.environment.items():
            monkeypatch.setenv(key, value)
        args = build_parser().parse_args(list(svc.argv[1:]))
        if svc.argv[1] == "shard":
            assert (args.tp_size, args.tp_rank) == (2, int(svc.environment["RANK"]))
            assert args.master_addr == svc.environment["MASTER_ADDR"]
            assert args.comm_codec == svc.environment["SHARDWIRE_COMM_CODEC"]
            assert args.tp_timeout == float(svc.environment["SHARDWIRE_TP_TIMEOUT"])
        check = svc.healthcheck
        if check is not None:
            probe = build_parser().parse_args(list(check.argv[1:]))
            assert probe.command == "probe"
        for key in svc.environment:
            monkeypatch.delenv(key)
    # Compose would reject a compose file with a cycle or an unknown dependency.
    start_order(by_name)


def test_the_file_is_plain_json_compatible(compose: dict) -> None:
    # Merge keys and anchors are resolved: what `docker compose config` prints.
    text = json.dumps(compose)
    assert "<<" not in text and "x-shard-env" in compose
