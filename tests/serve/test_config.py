"""``ServeConfig``: the one typed set of settings from the CLI to every worker (issue 19)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from mnist_deploy.cli import cli
from mnist_deploy.errors import InputError
from mnist_deploy.serve import ServeConfig, create_app


def test_defaults_validation_and_the_trip_to_a_worker():
    c = ServeConfig()
    assert c.artifacts == Path("artifacts") and c.max_body_bytes == 1 << 20 and not c.batching
    c = ServeConfig(artifacts="a", max_batch_size=8, preferred_batch_sizes=[4, 8], workers=2)
    assert c.artifacts == Path("a") and c.preferred_batch_sizes == (4, 8) and c.batching
    assert pickle.loads(pickle.dumps(c)) == c  # spawned workers receive it pickled
    for bad in ({"workers": 0}, {"max_batch_size": 4, "preferred_batch_sizes": (8,)}, {"drain_timeout": 0},
                {"loop": "tokio"}, {"max_body_bytes": 0}, {"max_queue_delay_us": -1}):
        with pytest.raises(InputError):
            ServeConfig(**bad)


def test_create_app_reads_the_config_and_overrides(tmp_path):
    app = create_app(ServeConfig(artifacts=tmp_path, max_body_bytes=4096), max_batch=7)
    assert app.service.config.artifacts == tmp_path
    assert (app.service.max_body_bytes, app.service.max_batch) == (4096, 7)


@pytest.mark.parametrize("args, message", [
    (["--drain-timeout", "0"], "--drain-timeout"),
    (["--max-batch-size", "4", "--preferred-batch-sizes", "8"], "--preferred-batch-sizes"),
    (["--preferred-batch-sizes", "a,b"], "--preferred-batch-sizes"),
])
def test_cli_refuses_bad_serve_settings_in_one_line(args, message, tmp_path):
    r = CliRunner().invoke(cli, ["serve", "--artifacts", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
