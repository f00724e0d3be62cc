"""A federation of two machines with Flower's deployment engine: the commands for each
machine, and the same deployment rehearsed on this one.

    .venv/bin/python examples/two_nodes.py --superlink superlink.example.org --out creds
        # writes the certificates and node keys, and prints what to run where
    .venv/bin/python examples/two_nodes.py --here rounds=2
        # runs a SuperLink and two SuperNodes as separate processes on this machine
        # (TLS, registered node keys) and checks the run finished

Every machine needs sfedlora installed (the same version) and the experiment config at
the same path; node k serves client k (``partition-id``) and keeps its private state
(under SFed-LoRA, its B and head) in its own ``state-dir``, which never leaves it.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from sfedlora.runtime.flower.credentials import make_node_key, make_tls
from sfedlora.runtime.flower.deploy import deploy_local, write_app

NODES = 2


def commands(superlink: str, creds: Path, config: str, port: int = 8000
             ) -> dict[str, list[str]]:
    """What to run on each machine, in order (the SuperLink's machine first)."""
    tls = make_tls(creds / "tls", [superlink])
    keys = [make_node_key(creds / "keys", f"node-{k}") for k in range(NODES)]
    app = write_app(creds / "app")
    address = f"{superlink}:{port}"
    config_toml = creds / "flwr-config.toml"
    config_toml.write_text(f'[superlink.cluster]\naddress = "{address}"\n'
                           f'root-certificates = "{tls.ca_cert}"\n')
    run_config = f'config-file="{config}" overrides="clients.num={NODES}"'
    plan = {
        "superlink (one machine)": [
            f"flower-superlink --ssl-ca-certfile {tls.ca_cert} --ssl-certfile "
            f"{tls.server_cert} --ssl-keyfile {tls.server_key} --enable-supernode-auth "
            "--disable-runtime-dependency-installation --isolation subprocess "
            f"--host 0.0.0.0 --port {port}",
        ],
        "submitting machine (once)": [
            f"cp {config_toml} ~/.flwr/config.toml   # or merge the [superlink.cluster] table",
            *(f"flwr supernode register {key.public} cluster" for key in keys),
        ],
    }
    for k, key in enumerate(keys):
        node_config = shlex.quote(f'partition-id={k} state-dir="/var/lib/sfedlora"')
        plan[f"node {k} (its own machine; copy {key.private} and {tls.ca_cert} there)"] = [
            f"flower-supernode --superlink {address} --root-certificates {tls.ca_cert} "
            f"--auth-supernode-private-key {key.private} --isolation process "
            f"--port 9094 --node-config {node_config}",
            "sfedlora node-runtime --clientappio-api-address 127.0.0.1:9094   # beside it",
        ]
    plan["submitting machine (the run)"] = [
        f"flwr run {app} cluster -c {shlex.quote(run_config)} --stream",
    ]
    return plan


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--superlink", default="superlink.example.org",
                        help="the SuperLink's host name or IP (in its certificate)")
    parser.add_argument("--out", type=Path, default=Path("runs/two_nodes"))
    parser.add_argument("--config", default=str(Path("configs/demo.yaml").resolve()))
    parser.add_argument("--here", action="store_true",
                        help="rehearse the deployment on this machine instead")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (with --here)")
    args = parser.parse_args(argv)
    if args.here:
        run_dir = deploy_local(args.config, [*args.overrides,
                                             f"output_dir={(args.out / 'run').resolve()}"],
                               NODES, overwrite=True)
        print("run directory:", run_dir)
        return run_dir
    plan = commands(args.superlink, args.out.resolve(), args.config)
    for machine, lines in plan.items():
        print(f"# {machine}")
        print("\n".join(lines), end="\n\n")
    return plan


if __name__ == "__main__":
    main()
