"""The real openpi-client talking to `python -m jaxvla.serve` (run it in openpi-client's own venv).

openpi-client pins numpy<2 (jaxvla needs numpy 2), so it gets a virtual environment of its own;
0.1.2 also imports typing_extensions without declaring it:

    python3 -m venv /tmp/openpi && /tmp/openpi/bin/pip install openpi-client==0.1.2 typing_extensions
    python -m jaxvla.serve --checkpoint=runs/demo/finetune_... --port=8765 --token=SECRET &
    /tmp/openpi/bin/python scripts/openpi_client_check.py --port=8765 --api_key=SECRET

It fetches the server's metadata, infers one chunk from a 224 x 224 frame and a float64 state
(what openpi's examples send), runs openpi's ActionChunkBroker over two chunks, and shows that an
error reply raises in the client and that a wrong api_key is refused. It imports nothing from
jaxvla.
"""

import argparse
from importlib import metadata

import numpy as np
from openpi_client import action_chunk_broker, websocket_client_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=None)
    args = parser.parse_args()

    print("openpi-client", metadata.version("openpi-client"), "numpy", np.__version__)
    remote = websocket_client_policy.WebsocketClientPolicy(args.host, args.port, api_key=args.api_key)
    meta = remote.get_server_metadata()
    print("metadata:", {k: meta[k] for k in ("action_horizon", "execute_steps", "image_size")})
    frame_224 = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    observation = {"observation/image": frame_224, "observation/state": np.zeros(39), "prompt": "open the drawer"}
    spec = meta["observation_spec"]
    if "prev_image" in spec:
        observation["observation/prev_image"] = frame_224
    reply = remote.infer(observation)
    print("infer:", reply["actions"].shape, reply["actions"].dtype, "server_timing", sorted(reply["server_timing"]))
    broker = action_chunk_broker.ActionChunkBroker(remote, action_horizon=meta["execute_steps"])
    actions = [broker.infer(observation)["actions"] for _ in range(2 * meta["execute_steps"])]
    print(f"ActionChunkBroker: {len(actions)} actions of shape {actions[0].shape} from 2 chunks")
    try:
        remote.infer({"observation/image": frame_224.astype(np.float32), "prompt": "open the drawer"})
    except RuntimeError as error:
        lines = str(error).splitlines()
        print("error reply raised RuntimeError:", lines[0], "|", lines[1][:100])
    try:
        websocket_client_policy.WebsocketClientPolicy(args.host, args.port, api_key="WRONG")
    except Exception as error:  # websockets' InvalidStatus
        print("wrong api_key:", type(error).__name__, str(error)[:60])


if __name__ == "__main__":
    main()
