"""Nothing leaves the box unasked: the runtime's telemetry stays off in the inference process.
ORT and ORT GenAI (1DS SDK) keep a device id and an offline queue of usage events under
$XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime before they upload them; with the switch
off they create neither. A real model load, in a fresh process with its own cache folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edge_agent.inference.child import RUNTIME_TELEMETRY_OFF

# the runtime also stays quiet on its own in CI: those names must not be what keeps it quiet here
CI_NAMES = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "ORT_RUNNING_UNIT_TESTS")

LOAD = """
import os, sys
from edge_agent.inference.child import engine  # noqa: F401 - the package the worker runs
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
params.set_search_options(max_length=8)
generator = og.Generator(model, params)
generator.append_tokens(og.Tokenizer(model).encode("hi"))
while not generator.is_done():
    generator.generate_next_token()
print(",".join(os.environ[name] for name in sys.argv[2:]))
"""


def test_the_inference_package_turns_runtime_telemetry_off(tiny_model: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (*CI_NAMES, *RUNTIME_TELEMETRY_OFF)}
    env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", LOAD, str(tiny_model), *RUNTIME_TELEMETRY_OFF], env=env,
                         check=True, stdout=subprocess.PIPE, text=True, timeout=120)
    assert out.stdout.strip() == ",".join("1" for _ in RUNTIME_TELEMETRY_OFF)
    assert not (tmp_path / "cache" / "Microsoft").exists()  # no device id, no event queue
    assert [p.name for p in tmp_path.rglob("*") if "onnxruntime" in p.name] == []


def test_a_users_own_choice_is_left_alone() -> None:
    """Setting it to 0 is asking: the package does not overrule that (and nothing loads here)."""
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "0"}
    out = subprocess.run([sys.executable, "-c", "import os, edge_agent.inference.child; "
                          "print(os.environ['ORT_DISABLE_TELEMETRY'])"],
                         env=env, check=True, stdout=subprocess.PIPE, text=True, timeout=60)
    assert out.stdout.strip() == "0"
