"""The deployment files under infra/ (issue #6): they parse, docker-compose accepts the compose
file, and every image, command, setting and repository path they name exists in the project.

No container engine is needed: Debian's `docker-compose` 1.29 validates and normalises the compose
file on its own (infra/setup.sh installs it). The friendrec commands are checked against the Typer
app itself, the FRIENDREC_* variables against the Settings model.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from friendrec.cli import app
from friendrec.config import Settings, get_settings, load_settings

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
COMPOSE_FILE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
PRODUCTION = INFRA / "config" / "production.yaml"
SECRETS_EXAMPLE = INFRA / "config" / "secrets.example.env"
PROMETHEUS = INFRA / "prometheus" / "prometheus.yml"
TFSERVING_DIR = INFRA / "tfserving"
CONTAINER_CONFIG = "/etc/friendrec/config.yaml"
# The one FRIENDREC_* variable that is not a settings field: it names the YAML file.
NOT_A_FIELD = {"FRIENDREC_CONFIG"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


# ------------------------------------------------------------------------------------ loading
def yaml_files() -> list[Path]:
    return sorted({*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")})


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in k8s_files() for doc in load_all(path)]


def pod_specs(doc: dict) -> list[dict]:
    """Every pod template of a workload (a RayCluster has its head's and each worker group's)."""
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
        return [group["template"]["spec"] for group in groups]
    return []


def pod_spec(doc: dict) -> dict:
    (spec,) = pod_specs(doc)
    return spec


def k8s_containers() -> Iterator[tuple[str, dict]]:
    for path, doc in k8s_docs():
        for spec in pod_specs(doc):
            yield from _containers(path, doc, spec)


def _containers(path: Path, doc: dict, spec: dict) -> Iterator[tuple[str, dict]]:
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        name = doc["metadata"].get("name") or doc["metadata"]["generateName"]
        where = f"{path.relative_to(REPO)}: {doc['kind']} {name}, container {container['name']}"
        yield where, container


@pytest.fixture(scope="module")
def compose() -> dict:
    """`docker-compose config` output: the normalised file (anchors merged, env files read)."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: run infra/setup.sh (apt-get install docker-compose)"
    # A clean environment: host variables must not change what the file interpolates to.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    proc = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "--profile", "jobs", "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=INFRA,
        timeout=60,
    )
    assert proc.returncode == 0, f"docker-compose config rejected the file:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerfile_targets() -> dict[str, dict[str, Any]]:
    """Stage name -> its ENTRYPOINT/CMD (JSON form, inherited from the parent stage)."""
    args = {}
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, rest
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
            parent = stages.get(base, {"entrypoint": None, "cmd": None})
            current = {"base": base, "entrypoint": parent["entrypoint"], "cmd": parent["cmd"]}
            stages[match.group(2) or base] = current
        elif keyword in ("ENTRYPOINT", "CMD"):
            assert current is not None
            current[keyword.lower()] = json.loads(rest)  # exec form only
    return stages


# ------------------------------------------------------------------------ friendrec commands
def script_commands(script: str) -> list[list[str]]:
    """The `friendrec ...` commands of a shell script (one per line, up to a shell operator)."""
    commands = []
    for line in script.splitlines():
        tokens = shlex.split(line, comments=True)
        while "friendrec" in tokens:
            tokens = tokens[tokens.index("friendrec") + 1 :]
            end = next((i for i, t in enumerate(tokens) if t in SHELL_OPERATORS), len(tokens))
            commands.append(tokens[:end])
            tokens = tokens[end:]
    return commands


def container_commands(
    entrypoint: list[str] | None, command: list[str] | None, image_entrypoint: list[str] | None
) -> list[list[str]]:
    """friendrec argument lists a container runs (image entrypoint `friendrec` or a shell)."""
    entrypoint = entrypoint if entrypoint is not None else image_entrypoint
    command = command or []
    if entrypoint == ["friendrec"]:
        return [list(command)]
    if entrypoint and entrypoint[0] in ("/bin/sh", "sh", "/bin/bash", "bash"):
        return [cmd for part in command for cmd in script_commands(part)]
    argv = [*(entrypoint or []), *command]
    if argv and argv[0] in ("/bin/sh", "sh", "/bin/bash", "bash"):
        return [cmd for part in argv[1:] for cmd in script_commands(part)]
    if argv and Path(argv[0]).name == "friendrec":
        return [argv[1:]]
    return []


def all_friendrec_commands(compose: dict) -> list[tuple[str, list[str]]]:
    targets = dockerfile_targets()
    found: list[tuple[str, list[str]]] = []
    for name, stage in targets.items():
        if stage["entrypoint"] == ["friendrec"] and stage["cmd"]:
            found.append((f"Dockerfile target {name}", stage["cmd"]))
    for name, service in compose["services"].items():
        if not service.get("image", "").startswith("friendrec/"):
            continue
        target = service["build"]["target"]
        for cmd in container_commands(
            service.get("entrypoint"), service.get("command"), targets[target]["entrypoint"]
        ):
            found.append((f"compose service {name}", cmd))
    for where, container in k8s_containers():
        if not container["image"].startswith("friendrec/") or ": RayCluster " in where:
            continue  # (KubeRay writes a RayCluster pod's command: `ray start ...`)
        target = container["image"].split("/", 1)[1].split(":")[0]
        for cmd in container_commands(
            container.get("command"), container.get("args"), targets[target]["entrypoint"]
        ):
            found.append((where, cmd))
    return found


def check_cli_command(tokens: list[str]) -> None:
    """Every word is a real (sub)command and every option exists on the command it is given to;
    values are skipped according to the option's arity; no stray positional arguments."""
    # Typer vendors its own click: duck-typed (a group has `commands`, a flag `is_flag`).
    command = typer.main.get_command(app)
    help_only = "--help" in tokens  # e.g. an image's default CMD ["stream", "--help"]
    tokens = [t for t in tokens if t != "--help"]
    path: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            params = {o: p for p in command.params for o in (*p.opts, *p.secondary_opts)}
            assert name in params, f"{' '.join(['friendrec', *path])}: no option {name}"
            param = params[name]
            takes_value = not getattr(param, "is_flag", False)
            i += 2 if takes_value and "=" not in token else 1
            continue
        assert hasattr(command, "commands"), (
            f"friendrec {' '.join(path)}: unexpected argument {token!r}"
        )
        sub = command.commands.get(token)
        assert sub is not None, f"friendrec {' '.join(path)}: no command {token!r}"
        command, path = sub, [*path, token]
        i += 1
    if not help_only:
        assert not hasattr(command, "commands"), f"friendrec {' '.join(path)} needs a subcommand"
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    for token in tokens:
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            assert name in result.output or name in _root_options(), f"{name} not in --help"


def _root_options() -> set[str]:
    return {o for p in typer.main.get_command(app).params for o in p.opts}


# ------------------------------------------------------------------------- FRIENDREC_* vars
def field_path_exists(name: str) -> bool:
    """FRIENDREC_SERVING__PORT -> Settings.serving.port exists (walked through the models)."""
    model: type[BaseModel] = Settings
    parts = name.removeprefix("FRIENDREC_").lower().split("__")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def environments(compose: dict) -> list[tuple[str, dict[str, str]]]:
    """Every environment the deployment files give a friendrec process."""
    envs = []
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        if any(k.startswith("FRIENDREC_") for k in env) or service.get("image", "").startswith(
            "friendrec/"
        ):
            envs.append((f"compose service {name}", {k: str(v) for k, v in env.items()}))
    secret_keys: dict[str, str] = {}
    for _, doc in k8s_docs():
        if doc["kind"] == "Secret":
            secret_keys.update({k: str(v) for k, v in doc.get("stringData", {}).items()})
    for where, container in k8s_containers():
        env = {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}
        if any(ref.get("secretRef") for ref in container.get("envFrom", [])):
            env = {**secret_keys, **env}
        envs.append((where, env))
    envs.append((str(SECRETS_EXAMPLE.relative_to(REPO)), env_file(SECRETS_EXAMPLE)))
    docker_env = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            docker_env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    envs.append(("Dockerfile", docker_env))
    return envs


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for key in list(os.environ):
        if key.startswith("FRIENDREC_"):
            monkeypatch.delenv(key)
    yield monkeypatch
    get_settings.cache_clear()


# ======================================================================================= tests
@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert load_all(path), f"{path} is empty"


def test_k8s_documents_are_complete() -> None:
    docs = k8s_docs()
    assert docs
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service"} <= kinds
    assert {"HorizontalPodAutoscaler", "Job", "CronJob", "PersistentVolumeClaim"} <= kinds
    for path, doc in docs:
        where = f"{path.relative_to(REPO)}: {doc.get('kind')}"
        assert doc.get("apiVersion") and doc.get("kind"), where
        meta = doc.get("metadata") or {}
        # Jobs created with `kubectl create` get a fresh name per run (generateName).
        assert meta.get("name") or (doc["kind"] == "Job" and meta.get("generateName")), where
        if doc["kind"] != "Namespace":
            assert meta.get("namespace") == "friendrec", where


def test_kustomization_lists_exactly_the_files_present() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    present = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(listed) == present
    # jobs/ is created on demand, one Job at a time (not applied with the rest).
    assert not (K8S / "jobs" / "kustomization.yaml").exists()


def test_k8s_references_resolve() -> None:
    """ConfigMaps, Secrets, PVCs and HPA targets named by the workloads are defined."""
    defined = {(doc["kind"], doc["metadata"].get("name")) for _, doc in k8s_docs()}
    for _, doc in k8s_docs():
        if doc["kind"] == "HorizontalPodAutoscaler":
            ref = doc["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in defined
        for spec in pod_specs(doc):
            _check_pod_references(spec, defined, doc)


def _check_pod_references(spec: dict, defined: set, doc: dict) -> None:
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in defined
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert ("PersistentVolumeClaim", claim) in defined
    mounts = {v["name"] for v in spec.get("volumes", [])}
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in mounts, (doc["metadata"], mount)
        for ref in container.get("envFrom", []):
            assert ("Secret", ref["secretRef"]["name"]) in defined


def test_config_copies_match_the_repository_files() -> None:
    configmaps = {
        doc["metadata"]["name"]: doc for _, doc in k8s_docs() if doc["kind"] == "ConfigMap"
    }
    assert configmaps["friendrec-config"]["data"] == {"config.yaml": PRODUCTION.read_text()}
    tfserving = configmaps["tfserving-config"]["data"]
    assert tfserving == {name: (TFSERVING_DIR / name).read_text() for name in tfserving}
    assert set(tfserving) == {"models.config", "batching_parameters.txt", "monitoring.config"}


def test_docker_compose_accepts_the_file(compose: dict) -> None:
    services = compose["services"]
    assert {"kafka", "etcd", "minio", "milvus", "redis", "tfserving", "prometheus"} <= set(services)
    assert {"retrieval", "feature-updater", "embedding-refresher", "milvus-sink"} <= set(services)
    jobs = {name for name, s in services.items() if "jobs" in (s.get("profiles") or [])}
    assert {"features-job", "train-job", "index-job", "materialize-job"} <= jobs
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in kafka
    assert not any("zookeeper" in s.get("image", "") for s in services.values())
    assert services["milvus"]["command"] == ["milvus", "run", "standalone"]


def test_friendrec_commands_exist(compose: dict) -> None:
    commands = all_friendrec_commands(compose)
    seen = {" ".join(t for t in cmd if not t.startswith(("-", "$", '"'))) for _, cmd in commands}
    for expected in (
        "serve",
        "stream feature-updater",
        "stream embedding-refresher",
        "stream milvus-sink",
        "stream create-topics",
        "data prepare",
        "features materialize",
        "train",
        "export",
    ):
        assert any(s.startswith(expected) for s in seen), f"nothing runs `friendrec {expected}`"
    checked = set()
    for where, tokens in commands:
        if tuple(tokens) in checked:
            continue
        checked.add(tuple(tokens))
        try:
            check_cli_command(tokens)
        except AssertionError as exc:
            raise AssertionError(f"{where}: friendrec {' '.join(tokens)}: {exc}") from None


def test_check_cli_command_rejects_typos() -> None:
    check_cli_command(["index", "build", "--model-version", "3", "--tfserving"])
    for bad in (
        ["index", "biuld"],
        ["features", "materialize", "--incremntal"],
        ["serve", "extra"],
        ["stream"],
    ):
        with pytest.raises(AssertionError):
            check_cli_command(bad)


def test_friendrec_environment_variables_are_settings(
    compose: dict, clean_env: pytest.MonkeyPatch
) -> None:
    envs = environments(compose)
    names = {k for _, env in envs for k in env if k.startswith("FRIENDREC_")}
    assert "FRIENDREC_SERVING__PORT" in names and "FRIENDREC_MILVUS__TOKEN" in names
    assert field_path_exists("FRIENDREC_TFSERVING__HOST")
    assert not field_path_exists("FRIENDREC_TFSERVING__HOTS")
    assert not field_path_exists("FRIENDREC_SERVING__PORT__X")
    for where, env in envs:
        unknown = sorted(
            k
            for k in env
            if k.startswith("FRIENDREC_") and k not in NOT_A_FIELD and not field_path_exists(k)
        )
        assert not unknown, f"{where}: not settings fields: {unknown}"
        if env.get("FRIENDREC_CONFIG", CONTAINER_CONFIG) != CONTAINER_CONFIG:
            pytest.fail(f"{where}: FRIENDREC_CONFIG must be {CONTAINER_CONFIG}")
        for key in [k for k in os.environ if k.startswith("FRIENDREC_")]:
            clean_env.delenv(key)
        for key, value in env.items():
            if key.startswith("FRIENDREC_"):
                clean_env.setenv(key, value)
        # The container path is the ConfigMap / bind mount of production.yaml.
        clean_env.setenv("FRIENDREC_CONFIG", str(PRODUCTION))
        settings = load_settings()
        for key, value in env.items():
            if key.startswith("FRIENDREC_") and key not in NOT_A_FIELD:
                got: Any = settings
                for part in key.removeprefix("FRIENDREC_").lower().split("__"):
                    got = getattr(got, part)
                got = got.get_secret_value() if hasattr(got, "get_secret_value") else got
                assert str(got) == value, f"{where}: {key}={value!r} read as {got!r}"


def test_production_yaml_is_valid_settings(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FRIENDREC_CONFIG", str(PRODUCTION))
    settings = load_settings()
    assert settings.features.online_store == "redis"
    assert settings.milvus_uri.startswith("http://")
    assert settings.serving.auth_token is None and settings.milvus.token is None  # no secrets
    # models.config's policy and base path agree with the settings.
    models_config = (TFSERVING_DIR / "models.config").read_text()
    assert f'name: "{settings.serving.model_name}"' in models_config
    assert f"num_versions: {settings.tfserving.num_versions}" in models_config
    assert settings.tfserving.version_policy == "latest"
    assert f'base_path: "/models/{settings.serving.model_name}"' in models_config
    assert str(settings.model_base_path) == "/models"
    # Ports named by probes, Services, HPAs and Prometheus are the configured ones.
    workloads = {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == "Deployment"}
    retrieval = pod_spec(workloads["retrieval"])["containers"][0]
    assert retrieval["readinessProbe"]["grpc"]["port"] == settings.serving.port
    ports = {p["containerPort"] for p in retrieval["ports"]}
    assert {settings.serving.port, settings.serving.metrics_port} <= ports
    for _, doc in k8s_docs():
        if doc["kind"] == "HorizontalPodAutoscaler" and doc["metadata"]["name"] in (
            "feature-updater",
            "embedding-refresher",
            "milvus-sink",
        ):
            assert doc["spec"]["maxReplicas"] == settings.streaming.partitions
    targets = {
        (cfg["job_name"], sd["names"][0], sd["port"])
        for cfg in load_all(PROMETHEUS)[0]["scrape_configs"]
        for sd in cfg.get("dns_sd_configs", [])
    }
    ports_by_target = {name: port for _, name, port in targets}
    assert ports_by_target["retrieval"] == settings.serving.metrics_port
    for worker in ("feature-updater", "embedding-refresher", "milvus-sink"):
        assert ports_by_target[worker] == settings.streaming.metrics_port


def test_repository_paths_exist(compose: dict) -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for keyword, rest in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = shlex.split(rest)
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile COPY {source}: missing"
            assert not any(source == i or source.startswith(i + "/") for i in ignored), (
                f"Dockerfile COPY {source}: excluded by {DOCKERIGNORE.name}"
            )
    targets = dockerfile_targets()
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            assert Path(build["context"]).resolve() == REPO, name
            assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE, name
            assert build["target"] in targets, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and source.startswith("/") and Path(source).is_relative_to(REPO):
                assert Path(source).exists(), f"compose {name}: mount {source} missing"
    # The mounts of repository files that matter, spelled out.
    mounted = {
        v.split(":")[0]
        for s in compose["services"].values()
        for v in s.get("volumes", [])
        if isinstance(v, str)
    }
    for path in (PRODUCTION, PROMETHEUS, TFSERVING_DIR):
        assert str(path) in mounted, f"{path} is not mounted by any compose service"
    tfserving = compose["services"]["tfserving"]
    for flag in tfserving["command"]:
        if flag.startswith("--") and "=/config/" in flag:
            assert (TFSERVING_DIR / flag.split("=/config/", 1)[1]).is_file(), flag


def test_images_are_pinned(compose: dict) -> None:
    images = [(f"compose {n}", s["image"]) for n, s in compose["services"].items() if "image" in s]
    images += [(where, c["image"]) for where, c in k8s_containers()]
    images += [(f"Dockerfile {n}", s["base"]) for n, s in dockerfile_targets().items()]
    targets = dockerfile_targets()
    for where, image in images:
        if image in targets:  # FROM <an earlier stage>
            continue
        name, _, tag = image.rpartition("/")[2].partition(":")
        assert tag and tag != "latest", f"{where}: image {image} is not pinned to a tag"
        if image.startswith("friendrec/"):
            assert name in targets, f"{where}: {image} is not a target of {DOCKERFILE.name}"
    for name, service in compose["services"].items():
        if service.get("image", "").startswith("friendrec/"):
            image_name = service["image"].split("/")[1].split(":")[0]
            assert image_name == service["build"]["target"], f"compose {name}: image vs target"


def test_container_healthcheck_script(tmp_path: Path) -> None:
    """The service image's health check reports an unreachable service as unhealthy (exit 1)."""
    stages = dockerfile_targets()
    assert "service" in stages and stages["service"]["cmd"] == ["serve"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRIENDREC_")}
    env["FRIENDREC_SERVING__PORT"] = "1"  # nothing listens there
    env["FRIENDREC_WORKDIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(INFRA / "docker" / "healthcheck.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unhealthy" in proc.stderr


def test_stream_workers_are_probed_by_their_heartbeat(compose: dict) -> None:
    """Every stream worker, in compose and in Kubernetes, writes a heartbeat file and is probed
    with `friendrec stream health` (readiness and liveness)."""
    check_cli_command(["stream", "health"])
    workers = ("feature-updater", "embedding-refresher", "milvus-sink")
    for name in workers:
        service = compose["services"][name]
        assert service["healthcheck"]["test"] == ["CMD", "friendrec", "stream", "health"], name
        assert "FRIENDREC_STREAMING__HEARTBEAT_FILE" in service["environment"], name
    probed = set()
    for where, container in k8s_containers():
        if container["name"] not in workers:
            continue
        assert container["args"] == ["stream", container["name"]], where
        env = {e["name"] for e in container.get("env", [])}
        assert "FRIENDREC_STREAMING__HEARTBEAT_FILE" in env, where
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["friendrec", "stream", "health"], where
        probed.add(container["name"])
    assert probed == set(workers)


def test_ray_cluster_matches_the_engine_settings(compose: dict) -> None:
    """The jobs' engine.ray_address names the head Service of the RayCluster and the compose
    head, and the cluster runs the Ray version the jobs were tested with."""
    from friendrec.config import Settings

    settings = Settings.model_validate(yaml.safe_load(PRODUCTION.read_text()))
    assert settings.engine.kind == "ray"
    host, _, port = (settings.engine.ray_address or "").partition(":")
    [cluster] = [doc for _, doc in k8s_docs() if doc["kind"] == "RayCluster"]
    assert cluster["spec"]["headGroupSpec"]["headService"]["metadata"]["name"] == host
    pinned = re.search(r"^ray\[[^\]]*\]==(\S+)", (REPO / "requirements.txt").read_text(), re.M)
    assert pinned and cluster["spec"]["rayVersion"] == pinned.group(1)
    head = compose["services"][host]
    assert f"--port={port}" in " ".join(head["command"]) and "jobs" in head["profiles"]
    for name in ("features-job", "materialize-job", "index-job"):
        assert host in compose["services"][name]["depends_on"], name


def test_training_group_job_names_its_own_pods_as_peers() -> None:
    """The Indexed Job of `train --join` pods: one peer per completion index, each peer the DNS
    name Kubernetes gives that pod (<job>-<index>.<subdomain>) on the collective port, a headless
    Service selecting the Job's pods, and the group configuration the workers compute from it."""
    from training.distributed import group_config

    docs = {(doc["kind"], doc["metadata"].get("name")): doc for _, doc in k8s_docs()}
    job = docs[("Job", "friendrec-train-group")]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert pod["restartPolicy"] == "OnFailure"  # a restarted pod keeps its DNS name
    service = docs[("Service", pod["subdomain"])]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    peers = env["TRAIN_GROUP_PEERS"].split(",")
    [port] = {p["containerPort"] for p in container["ports"]}
    assert port == service["spec"]["ports"][0]["port"]
    assert peers == [
        f"{job['metadata']['name']}-{i}.{pod['subdomain']}:{port}"
        for i in range(spec["completions"])
    ]
    script = container["args"][0]
    assert "friendrec train --join" in script and '"$JOB_COMPLETION_INDEX" != 0 ] ||' in script
    for index in range(spec["completions"]):
        environ = {**env, "JOB_COMPLETION_INDEX": str(index)}
        assert group_config(environ)["task"]["index"] == index
