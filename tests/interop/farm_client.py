"""A labgrid client test, run inside the guest by labgrid_farm.sh (as a user's test would).

    python3 farm_client.py ENV_YAML OUT_JSON -- CMD...

Loads the labgrid environment ENV_YAML (a RemotePlace or a local EEMBoard, with
EEMBridgeDriver, importing eembridge.farm), activates the driver (the board's link
comes up), runs CMD with $TAP and $PEER set to what the driver says, then takes the
driver's stats() and echo() and deactivates it. Everything it saw goes to OUT_JSON;
its exit status is CMD's, or 3 if the driver failed (the reason in OUT_JSON).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback


def main() -> int:
    env_yaml, out_path, sep, *cmd = sys.argv[1:]
    assert sep == "--" and cmd, __doc__
    out: dict = {}
    t0 = time.monotonic()
    try:
        from labgrid import Environment

        target = Environment(env_yaml).get_target("main")
        driver = target.get_driver("EEMBridgeDriver")  # activates: the link comes up
        out["activate_s"] = round(time.monotonic() - t0, 2)
        out.update(tap=driver.tap, addresses=list(driver.addresses), peer=driver.peer,
                   host=driver.host, local=driver.local, board=type(driver.board).__name__)
        out["stats_before"] = driver.stats()
        proc = subprocess.run(cmd, env={**os.environ, "TAP": driver.tap, "PEER": driver.peer or ""})
        out["cmd_rc"] = proc.returncode
        out["stats_after"] = driver.stats()
        out["echo"] = driver.echo(count=5, timeout=2.0, interval=0.1)
        target.deactivate(driver)
        out["deactivated"] = True
        rc = proc.returncode
    except Exception as exc:  # the file says what failed; the test shows it
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        rc = 3
    out["seconds"] = round(time.monotonic() - t0, 2)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
