"""Serve a robot policy over websockets with msgpack-numpy messages, speaking openpi's protocol.

Modules: ``codec`` (msgpack-numpy), ``images`` (fitting frames to the policy's size), ``server``
(``PolicyServer``), ``client`` (``Client``; needs no JAX: ``python -c "import sys,
jaxvla.serving.client; assert 'jax' not in sys.modules"``), ``cli`` (``python -m jaxvla.serving
--checkpoint=DIR``, also ``python -m jaxvla.serve``). This package imports none of them.

Wire protocol (version 2)
-------------------------
Every message from a client, and every reply that is not an error, is a binary frame holding one
msgpack map. numpy arrays travel as ``{b"__ndarray__": True, b"data": raw bytes, b"dtype":
dtype.str, b"shape": [...]}`` and numpy scalars as ``{b"__npgeneric__": True, b"data": item,
b"dtype": dtype.str}`` (openpi's ``msgpack_numpy``); other map keys decode as str.

On connect the server sends its metadata: ``policy.metadata`` (e.g. ``head``, ``chunk`` = K,
``action_dim`` = A, ``execute_steps``, ``image_size``) plus ``action_horizon`` (= ``chunk``,
openpi's name for the chunk length), ``server: "jaxvla"``, ``protocol: 2`` and
``observation_spec: {key: {"shape": [...], "dtype": ...}}`` (the required keys). A ``Policy``
finetuned with frame history also requires ``"prev_image"`` (uint8, the frame ``history_stride``
control steps before ``"image"``, the episode's first frame while t < k: the client keeps its
frames, the server is stateless), one with state prompts ``"state"`` (float32 ``[state_size]``,
e.g. Meta-World's 39-d state); the metadata carries ``history_frames``, ``history_stride`` and
``state_dims``.

Then each client message gets exactly one reply, in order:

* ``{"type": "health"}`` -> ``{"status": "ok", "uptime_s": float, "requests": int,
  "errors": int, "busy": bool}`` (answered at once, even while an inference is running).
* ``{"observation": {"image": uint8 [H, W, 3], ...}, "instruction": str}``, or openpi's flat
  layout ``{"observation/image": ..., ..., "prompt": str}`` -> ``{"actions": float32 [K, A],
  "server_timing": {"infer_ms": float, "total_ms": float}}``.
* anything malformed (undecodable bytes, a text frame, a non-map, a missing / mis-shaped /
  mis-typed observation key, a non-str instruction) or an exception inside ``policy.act`` -> a
  **text frame** holding the error message (protocol 1 sent ``{"error": str}`` as msgpack).
  openpi's ``WebsocketClientPolicy.infer`` raises ``RuntimeError("Error in inference
  server:\\n" + text)`` on a text reply; jaxvla's ``Client`` raises ``ServerError`` (a
  RuntimeError) ``"policy server error: " + text``. The connection stays open.

Observation keys: each required key ``k`` may also be sent as openpi's ``"observation/k"``
(``observation/image``, ``observation/state``, ``observation/prev_image``); DROID's
``observation/exterior_image_1_left`` is also the ``image``. Keys the policy does not read
(openpi's wrist cameras, DROID's joint / gripper positions, anything else) are ignored: only the
spec's keys reach the policy. A missing required key is an error naming it, the expected dtype
and shape, and its openpi spellings; sending one key under two names is an error.

Frames: the uint8 check is exact (no conversion). A uint8 ``[H, W, 3]`` frame of another size
(e.g. openpi's 224 x 224) is center-cropped to a square (side ``min(H, W)``) and resized to the
policy's ``image_size``: area averaging when shrinking, bilinear when enlarging, rounded half up
(``jaxvla.serving.images``), on the inference worker. Float inputs of a float32 key (``state``;
openpi's clients send float64) are cast to float32.

Inference runs on one worker thread (the policy is not thread-safe), off the event loop. Requests
are validated before they are queued for it: an instruction longer than ``max_instruction_chars``
(``--max_instruction_chars``, default 2048) or, when the policy has ``check_instruction`` (a real
``Policy`` does), one whose prompt does not fit the policy's sequence is refused with an error
naming the limit and the length, so it never delays other clients' inferences.

The server binds 127.0.0.1 by default. With a token (``--token`` or ``JAXVLA_SERVE_TOKEN``) the
handshake must carry ``Authorization: Bearer <token>`` (jaxvla's ``Client``) or ``Authorization:
Api-Key <token>`` (openpi's ``WebsocketClientPolicy(api_key=...)``), compared in constant time,
or it is refused with HTTP 401. A plain ``GET /healthz`` answers 200 "ok".
"""
