"""The deploy files of docker/deploy/: Kubernetes manifests and a multi-host compose file.

No cluster or Docker daemon is used. The files are checked for what would break a deployment:
fields Kubernetes requires, selectors and ports that do not meet, addresses in the model's YAML
that are not the backends' DNS names, a token file where no Secret is mounted, a backend module
that does not exist, a privileged container, a model YAML the gateway would refuse.
"""

from __future__ import annotations

import functools
import posixpath
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.app import create_app
from gateway.auth import Scope, scope_of
from gateway.config import ModelConfig, load_catalog
from gateway.gallery.index import load_gallery
from gateway.settings import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "docker" / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.multihost.yaml"
NAMESPACE = "hearth"
#: Where the image keeps the models dir (docker/Dockerfile: VOLUME /models, HEARTH_MODELS_DIR).
MODELS_PATH = "/models"
#: The apiVersion of each kind the manifests use (a typo or a removed beta version fails here).
API_VERSIONS = {
    "Namespace": "v1",
    "PersistentVolumeClaim": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
}
#: Volume kinds Pod Security's "restricted" profile allows (and the only ones used here).
ALLOWED_VOLUMES = {"configMap", "secret", "persistentVolumeClaim", "emptyDir", "projected"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# Reading the files. ------------------------------------------------------------------------


@functools.cache
def manifests() -> tuple[dict[str, Any], ...]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                assert isinstance(document, dict), f"{path.name}: a document is not a mapping"
                found.append(document)
    return tuple(found)


def objects(kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests() if m["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    matches = [m for m in objects(kind) if m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def workloads() -> list[dict[str, Any]]:
    return objects("Deployment") + objects("StatefulSet")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def argv(container: dict[str, Any]) -> list[str]:
    """What the container runs: its command and args (the image's entrypoint if no command)."""
    return [*container.get("command", []), *container.get("args", [])]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def gateway() -> dict[str, Any]:
    [deployment] = objects("Deployment")
    return deployment


def gateway_container() -> dict[str, Any]:
    [container] = pod_spec(gateway())["containers"]
    return container


def backend_sets() -> list[dict[str, Any]]:
    sets = objects("StatefulSet")
    assert sets, "no backend StatefulSet"
    return sets


def backend_container(statefulset: dict[str, Any]) -> dict[str, Any]:
    [container] = pod_spec(statefulset)["containers"]
    return container


@functools.cache
def configmap_models() -> dict[str, dict[str, Any]]:
    """The model YAMLs the ConfigMap holds, by file name."""
    found = {}
    for configmap in objects("ConfigMap"):
        for name, text in configmap.get("data", {}).items():
            assert name.endswith(".yaml"), f"ConfigMap key {name} is not a model YAML"
            found[name] = yaml.safe_load(text)
    assert found, "no model YAML in any ConfigMap"
    return found


def static_models() -> list[dict[str, Any]]:
    return [m for m in configmap_models().values() if "static" in (m.get("placement") or {})]


def option(arguments: list[str], flag: str) -> str:
    assert flag in arguments, f"{flag} missing from {arguments}"
    return arguments[arguments.index(flag) + 1]


def mounted_file(container: dict[str, Any], volumes: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume (its definition) that a file at `path` comes from, in `container`."""
    for mount in container.get("volumeMounts", []):
        if posixpath.dirname(path) == mount["mountPath"].rstrip("/"):
            return volumes[mount["name"]]
    raise AssertionError(f"nothing is mounted where {path} is, in container {container['name']}")


def volumes_of(workload: dict[str, Any]) -> dict[str, Any]:
    return {volume["name"]: volume for volume in pod_spec(workload).get("volumes", [])}


def documented_secrets(text: str) -> dict[str, set[str]]:
    """`kubectl create secret generic NAME --from-literal=KEY=...` commands in `text`: the keys
    of each Secret they make."""
    secrets: dict[str, set[str]] = {}
    commands = re.split(r"kubectl\s", text.replace("\\\n", " "))
    for command in commands:
        made = re.search(r"create secret generic ([a-z0-9-]+)", command)
        if made is not None:
            keys = re.findall(r"--from-(?:literal|file)=([A-Za-z0-9._-]+)=", command)
            secrets[made.group(1)] = set(keys)
    return secrets


def backend_module(arguments: list[str]) -> str:
    """The backend module `python -m backends.<name>` runs, checked to exist in this repo."""
    module = option(arguments, "-m")
    package, _, name = module.partition(".")
    assert package == "backends", f"{module} is not one of Hearth's backends"
    assert name != "runtime", "backends.runtime is the backends' shared part, not a backend"
    main = ROOT / "backends" / name / "__main__.py"
    assert main.is_file(), f"{module}: there is no {main.relative_to(ROOT)}"
    assert "run(" in main.read_text(), f"{main.relative_to(ROOT)} does not run a backend"
    python = arguments.index("-m") - 1
    assert arguments[python] in {"python", "python3"}, arguments
    return module


def address_port(arguments: list[str]) -> int:
    """The port of a backend's `--address`, which must be every interface of its container."""
    host, _, port = option(arguments, "--address").rpartition(":")
    assert host == "0.0.0.0", f"a backend in its own container listens on 0.0.0.0, not {host}"
    return int(port)


def load_models(
    tmp_path: Path, files: dict[str, str], model_files: list[str]
) -> dict[str, ModelConfig]:
    """`files` (name: YAML text) loaded as the gateway loads a models dir, with each model file
    there (empty), as the install would have put it; no errors allowed."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for relative in model_files:
        target = tmp_path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    catalog = load_catalog(tmp_path)
    assert catalog.errors == []
    return catalog.models


def check_weights_install(install: list[str], model_path: str) -> None:
    """`hearth models install --models-dir D NAME` puts the file the model YAML names there."""
    assert install[:3] == ["hearth", "models", "install"], install
    models_dir = option(install, "--models-dir")
    rest = install[3:]
    at = rest.index("--models-dir")
    [name] = rest[:at] + rest[at + 2 :]
    entry = load_gallery().get(name)
    assert entry is not None, f"the gallery has no entry {name}"
    relative = posixpath.relpath(models_dir, MODELS_PATH)
    assert not relative.startswith(".."), f"{models_dir} is outside {MODELS_PATH}"
    # Not the top of the models dir: the gateway would serve the gallery's own YAML there too,
    # and refuse the install once another model's YAML names a file in its folder.
    assert relative != "."
    assert model_path == posixpath.join(relative, entry.yaml()["model"])


# Kubernetes: the objects themselves. -------------------------------------------------------


def test_every_manifest_is_an_object_kubernetes_accepts() -> None:
    assert len(list(K8S.glob("*.yaml"))) >= 5
    seen = set()
    for manifest in manifests():
        kind = manifest.get("kind")
        assert kind in API_VERSIONS, f"unexpected kind {kind}"
        assert manifest.get("apiVersion") == API_VERSIONS[kind], kind
        name = manifest["metadata"]["name"]
        assert DNS_LABEL.match(name), f"{kind} name {name!r}"
        assert len(name) <= 63, f"{kind} name {name!r}"
        if kind != "Namespace":
            assert manifest["metadata"].get("namespace") == NAMESPACE, f"{kind} {name}"
        assert (kind, name) not in seen, f"two {kind}s named {name}"
        seen.add((kind, name))
        if kind != "Namespace":
            assert "spec" in manifest or "data" in manifest, f"{kind} {name} is empty"
    assert one("Namespace", NAMESPACE)


def test_every_pod_belongs_to_its_workload_and_names_its_volumes() -> None:
    claims = {c["metadata"]["name"] for c in objects("PersistentVolumeClaim")}
    configmaps = {c["metadata"]["name"] for c in objects("ConfigMap")}
    for workload in workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels_match(selector, labels), workload["metadata"]["name"]
        volumes = volumes_of(workload)
        for container in all_containers(workload):
            assert container.get("image"), container["name"]
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']}: {mount['name']}"
                assert mount["mountPath"].startswith("/")
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
    # Two workloads whose pods one selector would both match would share Services.
    for a in workloads():
        for b in workloads():
            if a is not b:
                selector = a["spec"]["selector"]["matchLabels"]
                assert not labels_match(selector, b["spec"]["template"]["metadata"]["labels"])


def test_each_service_reaches_a_container_port_of_one_workload() -> None:
    for service in objects("Service"):
        selector = service["spec"]["selector"]
        matched = [
            w
            for w in workloads()
            if labels_match(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)}"
        ports = [p for c in pod_spec(matched[0])["containers"] for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            found = [p for p in ports if target in (p.get("name"), p["containerPort"])]
            assert len(found) == 1, f"{service['metadata']['name']}: no container port {target}"
            assert found[0]["containerPort"] == port["port"], "port and container port differ"
            assert port.get("protocol", "TCP") == found[0].get("protocol", "TCP")


def test_static_addresses_are_the_statefulset_pods_dns_names() -> None:
    [model] = static_models()
    addresses = model["placement"]["static"]["addresses"]
    host, _, port = addresses[0].rpartition(":")
    pod, _, service_name = host.partition(".")
    statefulset = one("StatefulSet", pod.rpartition("-")[0])
    service = one("Service", statefulset["spec"]["serviceName"])
    # A headless Service, so that each pod has a DNS name: <pod>.<service>.
    assert service["spec"].get("clusterIP") == "None"
    assert labels_match(
        service["spec"]["selector"], statefulset["spec"]["template"]["metadata"]["labels"]
    )
    assert service_name == service["metadata"]["name"]
    [service_port] = service["spec"]["ports"]
    name = statefulset["metadata"]["name"]
    replicas = statefulset["spec"]["replicas"]
    # Replica i of the model is pod i: StatefulSet pods are <name>-0 ... <name>-(replicas - 1).
    assert addresses == [
        f"{name}-{i}.{service_name}:{service_port['port']}" for i in range(replicas)
    ]
    container = backend_container(statefulset)
    assert address_port(argv(container)) == service_port["port"] == int(port)
    assert model.get("replicas", len(addresses)) == replicas == 2


def test_the_configmap_model_loads_as_a_static_placement_of_two_replicas(tmp_path: Path) -> None:
    files = {name: text for c in objects("ConfigMap") for name, text in c["data"].items()}
    paths = [m["model"] for m in configmap_models().values()]
    models = load_models(tmp_path, files, paths)
    [static] = static_models()
    config = models[static["name"]]
    assert config.placement_kind() == "static"
    assert config.replica_count() == 2
    placement = config.static_placement()
    assert placement is not None
    assert placement.addresses == static["placement"]["static"]["addresses"]
    assert placement.token_file is not None
    assert placement.token_file.startswith("/")


def test_token_file_is_the_secret_the_backends_were_started_with() -> None:
    [model] = static_models()
    token_file = model["placement"]["static"]["token_file"]
    volume = mounted_file(gateway_container(), volumes_of(gateway()), token_file)
    secret = volume["secret"]
    # Without `items`, each key of the Secret is a file named after it.
    assert "items" not in secret
    key = posixpath.basename(token_file)
    for statefulset in backend_sets():
        container = backend_container(statefulset)
        backend_token = option(argv(container), "--token-file")
        backend_volume = mounted_file(container, volumes_of(statefulset), backend_token)
        assert backend_volume["secret"]["secretName"] == secret["secretName"]
        assert posixpath.basename(backend_token) == key
    # The Secret is made with kubectl, as the files say, with that key.
    for where in (K8S / "00-namespace.yaml", DEPLOY / "README.md"):
        assert key in documented_secrets(where.read_text())[secret["secretName"]], where.name


def test_the_gateway_listens_on_the_pod_network_only_with_keys_from_a_secret() -> None:
    env = env_of(gateway_container())
    assert env["HEARTH_HOST"]["value"] == "0.0.0.0"
    assert "HEARTH_INSECURE" not in env
    documented = documented_secrets((K8S / "00-namespace.yaml").read_text())
    for name in ("HEARTH_API_KEYS", "HEARTH_ADMIN_KEYS"):
        reference = env[name]["valueFrom"]["secretKeyRef"]
        assert "value" not in env[name]
        assert reference["key"] in documented[reference["name"]]
    assert not [m for m in manifests() if m["kind"] == "Secret"], "a Secret is committed"


def test_every_pod_mounts_the_models_volume_at_the_gateways_models_dir() -> None:
    env = env_of(gateway_container())
    assert env["HEARTH_MODELS_DIR"]["value"] == MODELS_PATH
    claim = one("PersistentVolumeClaim", "hearth-models")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for workload in workloads():
        volumes = volumes_of(workload)
        for container in pod_spec(workload)["containers"]:
            [mount] = [
                m
                for m in container["volumeMounts"]
                if "persistentVolumeClaim" in volumes[m["name"]]
            ]
            assert mount["mountPath"] == MODELS_PATH
            source = volumes[mount["name"]]["persistentVolumeClaim"]
            assert source["claimName"] == "hearth-models"
            if workload["kind"] == "StatefulSet":
                assert mount.get("readOnly") is True  # a backend only reads


def test_backends_run_a_real_backend_module_with_the_token() -> None:
    for statefulset in backend_sets():
        container = backend_container(statefulset)
        arguments = argv(container)
        # `command` replaces the image's entrypoint, which would prepare a gateway's start.
        assert container.get("command"), "a backend must not run the image's entrypoint"
        assert "hearth-entrypoint" not in arguments
        module = backend_module(arguments)
        assert option(arguments, "--token-file").startswith("/run/secrets/")
        assert "--insecure" not in arguments
        # The backend the model's YAML names is the one these pods run.
        name = statefulset["metadata"]["name"]
        [model] = [
            m
            for m in static_models()
            if m["placement"]["static"]["addresses"][0].startswith(f"{name}-0.")
        ]
        assert module == f"backends.{model['backend']}"


def test_the_gateway_puts_the_weights_and_the_yaml_where_the_model_says(tmp_path: Path) -> None:
    [model] = static_models()
    init = {c["name"]: c for c in pod_spec(gateway())["initContainers"]}
    check_weights_install(argv(init["weights"]), model["model"])
    # The copy reads the ConfigMap's mount and writes the top of the models dir.
    copy = argv(init["model-yaml"])
    mounts = {m["mountPath"]: m["name"] for m in init["model-yaml"]["volumeMounts"]}
    volumes = volumes_of(gateway())
    [command] = [a for a in copy if a.startswith("cp ")]
    source, destination = shlex.split(command)[-2:]
    assert "configMap" in volumes[mounts[posixpath.dirname(source)]]
    assert destination.rstrip("/") == MODELS_PATH
    assert "persistentVolumeClaim" in volumes[mounts[MODELS_PATH]]
    # The image would also install its default models at the top (a second SmolLM2 served by
    # the gateway itself): none.
    assert env_of(gateway_container())["HEARTH_DEFAULT_MODELS"]["value"] == ""


def test_probes_ask_what_answers_without_a_key_or_token() -> None:
    routes = {
        (route.path, scope_of(handler))
        for route in create_app(Settings()).routes
        for handler in getattr(route, "route_handlers", [])
        if "GET" in handler.http_methods
    }
    for workload in workloads():
        for container in pod_spec(workload)["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            probes = [container[k] for k in container if k.endswith("Probe")]
            assert {"readinessProbe", "livenessProbe"} <= set(container), container["name"]
            for probe in probes:
                # A gRPC probe sends no token: the backend refuses it, every time.
                assert "grpc" not in probe
                if "httpGet" in probe:
                    assert (probe["httpGet"]["path"], Scope.OPEN) in routes
                    assert probe["httpGet"]["port"] in ports
                else:
                    assert probe["tcpSocket"]["port"] in ports


def test_no_container_runs_privileged_or_as_root() -> None:
    namespace = one("Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in workloads():
        spec = pod_spec(workload)
        assert not spec.get("hostNetwork")
        assert not spec.get("hostPID")
        assert not spec.get("hostIPC")
        assert spec.get("automountServiceAccountToken") is False
        pod_context = spec.get("securityContext", {})
        for volume in spec.get("volumes", []):
            assert set(volume) - {"name"} <= ALLOWED_VOLUMES, volume
        for container in all_containers(workload):
            context = container.get("securityContext", {})
            merged = {**pod_context, **context}
            assert context.get("privileged") is not True, container["name"]
            assert context.get("allowPrivilegeEscalation") is False, container["name"]
            assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
            assert not context.get("capabilities", {}).get("add"), container["name"]
            assert merged.get("runAsNonRoot") is True, container["name"]
            assert merged.get("runAsUser") != 0, container["name"]
            assert merged.get("seccompProfile", {}).get("type") == "RuntimeDefault"


def test_every_container_has_requests_and_a_memory_limit() -> None:
    for workload in workloads():
        for container in all_containers(workload):
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), container["name"]
            assert "memory" in resources.get("limits", {}), container["name"]


def test_the_network_policy_lets_only_the_gateway_reach_the_backends() -> None:
    [policy] = objects("NetworkPolicy")
    spec = policy["spec"]
    for statefulset in backend_sets():
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        assert labels_match(spec["podSelector"]["matchLabels"], labels)
        port = address_port(argv(backend_container(statefulset)))
        assert {"protocol": "TCP", "port": port} in spec["ingress"][0]["ports"]
    assert not labels_match(
        spec["podSelector"]["matchLabels"], gateway()["spec"]["template"]["metadata"]["labels"]
    )
    [rule] = spec["ingress"][0]["from"]
    assert labels_match(
        rule["podSelector"]["matchLabels"], gateway()["spec"]["template"]["metadata"]["labels"]
    )
    assert spec["policyTypes"] == ["Ingress"]


# Compose: two machines, one file. -----------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose_service(name: str) -> dict[str, Any]:
    """A service by name; each machine's part is a profile: the gateway's (with its one-shot
    `models`) and the backend's."""
    service = compose()["services"][name]
    assert service.get("profiles") == ["backend" if name == "backend" else "gateway"]
    return dict(service)


def compose_secret_path(service: dict[str, Any], path: str) -> str:
    """The compose secret a service gets at `path` (compose mounts each at /run/secrets/NAME)."""
    assert posixpath.dirname(path) == "/run/secrets", path
    name = posixpath.basename(path)
    assert name in service.get("secrets", []), f"{name} is not one of the service's secrets"
    assert "file" in compose()["secrets"][name]
    return name


def compose_volume(service: dict[str, Any], target: str) -> tuple[str, bool]:
    """The source of the service's volume mounted at `target`, and whether it is read-only."""
    for volume in service.get("volumes", []):
        source, mounted, *mode = volume.split(":")
        if mounted == target:
            return source, mode == ["ro"]
    raise AssertionError(f"nothing is mounted at {target}")


def test_compose_parts_run_on_their_own_machines() -> None:
    services = compose()["services"]
    # Every service in a profile: a bare `up` on either machine starts nothing by mistake.
    assert {tuple(s.get("profiles", ())) for s in services.values()} == {
        ("gateway",),
        ("backend",),
    }
    for name, service in services.items():
        assert service.get("privileged") is not True, name
        assert not service.get("cap_add"), name
        assert service.get("network_mode") != "host", name
        assert service.get("user", "1000") not in {"0", "root"}, name


def test_compose_backend_runs_a_real_backend_with_the_token() -> None:
    backend = compose_service("backend")
    arguments = backend["command"]
    # Not the image's entrypoint (keys and default models in the read-only models dir).
    assert backend["entrypoint"][0] == "tini"
    assert "hearth-entrypoint" not in backend["entrypoint"]
    model = yaml.safe_load((DEPLOY / "compose-models" / "smollm2.yaml").read_text())
    assert backend_module(arguments) == f"backends.{model['backend']}"
    compose_secret_path(backend, option(arguments, "--token-file"))
    assert "--insecure" not in arguments
    port = address_port(arguments)
    assert f"{port}:{port}" in backend["ports"]
    source, read_only = compose_volume(backend, MODELS_PATH)
    assert source in compose()["volumes"]
    assert read_only
    # The image's HEALTHCHECK asks a gateway's /readyz: a backend needs its own.
    assert str(port) in " ".join(backend["healthcheck"]["test"])


def test_compose_model_yaml_reaches_the_backend(tmp_path: Path) -> None:
    gateway_service = compose_service("gateway")
    backend = compose_service("backend")
    environment = gateway_service["environment"]
    assert environment["HEARTH_MODELS_DIR"] == MODELS_PATH
    assert environment["HEARTH_DEFAULT_MODELS"] == ""
    gateway_models, read_only = compose_volume(gateway_service, MODELS_PATH)
    assert gateway_models == compose_volume(backend, MODELS_PATH)[0]
    assert not read_only
    # The model YAML: mounted into a one-shot service, copied into the models dir before the
    # gateway starts.
    setup = compose_service("models")
    assert compose_volume(setup, MODELS_PATH)[0] == gateway_models
    assert gateway_service["depends_on"]["models"]["condition"] == (
        "service_completed_successfully"
    )
    [shell] = [a for a in setup["command"] if "&&" in a]
    steps = [shlex.split(step) for step in shell.split("&&")]
    check_weights_install(
        steps[0], yaml.safe_load((DEPLOY / "compose-models" / "smollm2.yaml").read_text())["model"]
    )
    copy = steps[1]
    assert copy[0] == "cp"
    assert posixpath.dirname(copy[-1]) == MODELS_PATH
    mounted = [v for v in setup["volumes"] if v.split(":")[1] == copy[-2]]
    [volume] = mounted
    local = (COMPOSE.parent / volume.split(":")[0]).resolve()
    assert local.is_file()
    # The gateway itself goes through the image's entrypoint as `hearth ...`, which alone makes
    # its keys on first start (any other command runs as it is).
    assert gateway_service["command"][0] == "hearth"
    assert gateway_service["command"][:2] == ["hearth", "run"]
    text = local.read_text()
    data = yaml.safe_load(text)
    models = load_models(tmp_path, {posixpath.basename(copy[-1]): text}, [data["model"]])
    config = models[data["name"]]
    placement = config.static_placement()
    assert placement is not None
    assert placement.token_file is not None
    # The gateway's token is the backend's: one compose secret, one file.
    assert compose_secret_path(gateway_service, placement.token_file) == compose_secret_path(
        backend, option(backend["command"], "--token-file")
    )
    port = address_port(backend["command"])
    assert [a.rpartition(":")[2] for a in placement.addresses] == [str(port)]
    assert config.replica_count() == 1


def test_the_token_file_is_never_committed() -> None:
    token = compose()["secrets"]["hearth-backend-token"]["file"]
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert posixpath.basename(token) in ignored


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    # `config` reads and checks the file (v1's schema); it needs no daemon.
    command = shutil.which("docker-compose")
    assert command is not None
    result = subprocess.run(
        [command, "-f", str(COMPOSE), "config", "-q"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HEARTH_NFS_SERVER": "nas.lan"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
