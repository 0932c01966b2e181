"""The open inference protocol (KServe v2, Triton's HTTP API) next to the service's own JSON API.

    GET  /v2/health/live                 200 while the process runs
    GET  /v2/health/ready                200 with a model loaded, else 400 (the protocol: "4xx means false")
    GET  /v2                             server metadata (name, version, extensions)
    GET  /v2/models/chestct              model metadata: platform, versions, input/output tensors, threshold
    GET  /v2/models/chestct/ready        200 when the model is loaded, else 400
    POST /v2/models/chestct/infer        probabilities for preprocessed images
    (each /v2/models/chestct/... also under /v2/models/chestct/versions/{version}/...)

The input is what `Predictor.prepare` (the pipeline's preprocess_image) returns, batched: `image`, UINT8,
[N, S, S, 1]; the output `probability`, FP32, [N, 1], from the very `Predictor.probabilities` /predict uses, and the
model's threshold is in the metadata's parameters. `probability_calibrated`, FP32, [N, 1], is that score through
the export's calibration map (metadata.json's `calibration`; the score itself for an uncalibrated export), with
the threshold on that scale in the parameters (`threshold_calibrated`). A lesion-map model (model.lesion_map) has
another output, `lesion_map`, FP32, [N, h, w, 1] (the lesion probability per cell, metadata.json's `lesion_map`);
a request without `outputs` gets every output, as the protocol says. Tensor data come as JSON (`data`, flat
row-major or nested to the shape) or through the binary tensor extension (an `Inference-Header-Content-Length`
header, the JSON header, then the raw bytes), which tritonclient uses by default; outputs are sent in binary when
asked (`binary_data_output`, or an output's `binary_data`). Errors are the protocol's `{"error": "..."}`.

The limits are /predict's: at most serve.max_files images per request, the body read within serve.body_timeout_s,
and the model run inside one of the serve.max_concurrent prediction slots.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from chestct.decision import DECISION_RULE
from chestct.params import ServeParams
from chestct.serving.limits import ServerBusyError
from chestct.serving.observability import model_version as version_of
from chestct.serving.observability import upload_rejection_reason
from chestct.serving.predictor import Predictor
from chestct.serving.uploads import UploadError, received_body

log = logging.getLogger("chestct.serving.v2")

MODEL_NAME = "chestct"
INPUT_NAME, INPUT_DATATYPE = "image", "UINT8"
OUTPUT_NAME, OUTPUT_DATATYPE = "probability", "FP32"
CALIBRATED_OUTPUT = "probability_calibrated"
LESION_MAP_OUTPUT = "lesion_map"
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"  # the extension's name in Triton's server metadata
MAX_JSON_HEADER = 64 * 1024  # the JSON part of a binary request, or the JSON around a request's data
JSON_BYTES_PER_VALUE = 8  # a uint8 written as JSON: up to 3 digits, a comma, and room for pretty-printing

# --- the protocol's objects (what /openapi.json declares) ---------------------------------------------------


class V2Problem(BaseModel):
    error: str


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str | float | int | bool]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None  # absent when the output is sent as binary


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


def inline_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its $defs written in place, for an openapi_extra request body (which cannot
    refer to pydantic's $defs)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def _problem(description: str) -> dict:
    return {"model": V2Problem, "description": description}


NOT_READY = {400: _problem("no model is loaded (the error says how to make one)")}
UNKNOWN_MODEL = {404: _problem(f"no such model or version: this server serves '{MODEL_NAME}' at its one version")}
NO_MODEL = {503: _problem("no model is loaded (the error says how to make one)")}
INFER_ERRORS = {
    400: _problem("not an inference request for this model: bad JSON, wrong input name, datatype or shape, "
                  "data that do not fill the shape, values outside 0-255"),
    408: _problem("the body stalled or trickled (serve.body_timeout_s)"),
    413: _problem("more images than serve.max_files, or a body larger than such a batch"),
    415: _problem("a compressed request body (Content-Encoding): send it uncompressed"),
    503: {"model": V2Problem, "headers": {"Retry-After": {"description": "seconds to wait when the server is busy",
                                                          "schema": {"type": "integer"}}},
          "description": "no model is loaded, or every prediction slot stayed busy for serve.queue_timeout_s"},
} | UNKNOWN_MODEL
INFER_OK = {200: {"description": "the probabilities; with binary outputs, the JSON header (its length in "
                                 f"{HEADER_LENGTH}) followed by the FP32 bytes",
                  "headers": {HEADER_LENGTH: {"description": "length of the JSON header of a binary answer",
                                              "schema": {"type": "integer"}}},
                  "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline_schema(InferRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": f"the JSON request ({HEADER_LENGTH} bytes), then the "
                                                           "binary tensor data"}}}}}


class V2Error(Exception):
    """A refused v2 request: its status, the protocol's error message and a metric reason."""

    def __init__(self, status_code: int, message: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code, self.message, self.reason, self.headers = status_code, message, reason, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status_code, headers=self.headers or None)


# --- the model behind the protocol --------------------------------------------------------------------------


def platform_of(format_name: str) -> str:
    """The protocol's platform string for an export format (Triton's naming style)."""
    if format_name.startswith("tflite"):
        return "tensorflow_lite"
    if format_name == "savedmodel":
        return "tensorflow_savedmodel"
    return "tensorflow_keras"


def output_tensors(predictor: Predictor) -> list[dict]:
    """The model's outputs as the protocol's metadata lists them: the probability (the score the threshold applies
    to), the calibrated probability, and a lesion map if any."""
    outputs = [{"name": OUTPUT_NAME, "datatype": OUTPUT_DATATYPE, "shape": [-1, 1]},
               {"name": CALIBRATED_OUTPUT, "datatype": OUTPUT_DATATYPE, "shape": [-1, 1]}]
    if predictor.has_lesion_map:
        outputs.append({"name": LESION_MAP_OUTPUT, "datatype": OUTPUT_DATATYPE,
                        "shape": [-1, *predictor.metadata.lesion_map.output.shape]})
    return outputs


def model_metadata(predictor: Predictor) -> dict:
    size = predictor.image_size
    return {"name": MODEL_NAME, "versions": [version_of(predictor)], "platform": platform_of(predictor.format),
            "inputs": [{"name": INPUT_NAME, "datatype": INPUT_DATATYPE, "shape": [-1, size, size, 1]}],
            "outputs": output_tensors(predictor),
            "parameters": {"threshold": predictor.threshold, "decision": DECISION_RULE,
                           "threshold_calibrated": float(predictor.calibration.apply(predictor.threshold)),
                           "calibration": predictor.calibration.describe(),
                           "positive_class": predictor.metadata.positive_class, "format": predictor.format,
                           "sha256": predictor.sha256, "max_batch_size": predictor.serve_params.max_files}}


def loaded_model(request: Request, model_name: str, version: str | None, unavailable_status: int = 503) -> Predictor:
    """The predictor serving `model_name` (at `version`), or the V2Error a client of that name should get."""
    if model_name != MODEL_NAME:
        raise V2Error(404, f"unknown model '{model_name}': this server serves '{MODEL_NAME}'", "unknown_model")
    predictor = request.app.state.predictor
    if predictor is None:
        raise V2Error(unavailable_status, f"model '{MODEL_NAME}' is not loaded: {request.app.state.unavailable}",
                      "no_model")
    current = version_of(predictor)
    if version is not None and version != current:
        raise V2Error(404, f"model '{MODEL_NAME}' has no version '{version}': this server has version '{current}'",
                      "unknown_version")
    return predictor


# --- reading an inference request ---------------------------------------------------------------------------


def body_limit(serve: ServeParams, image_size: int, binary: bool) -> int:
    """The largest body a batch of serve.max_files images needs, as raw bytes or as JSON numbers."""
    values = serve.max_files * image_size * image_size
    return MAX_JSON_HEADER + values * (1 if binary else JSON_BYTES_PER_VALUE)


async def read_body(request: Request, serve: ServeParams, image_size: int) -> bytes:
    """The request body, refused past body_limit (413) or when it stalls or trickles (408), as /predict's is."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise V2Error(415, f"compressed requests (Content-Encoding: {encoding}) are not supported; send the body "
                           "uncompressed (tritonclient: leave request_compression_algorithm unset)",
                      "unsupported_encoding")
    limit = body_limit(serve, image_size, binary=HEADER_LENGTH.lower() in request.headers)
    too_large = V2Error(413, f"the request is larger than {limit / 1e6:.1f} MB, the most a batch of "
                             f"serve.max_files = {serve.max_files} images of {image_size}x{image_size} needs; send "
                             "fewer images per request", "too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks = []
    try:
        async for chunk in received_body(request, limit, serve):
            chunks.append(chunk)
    except UploadError as exc:
        if exc.status_code == 413:
            raise too_large from None
        raise V2Error(exc.status_code, exc.detail, upload_rejection_reason(exc.status_code), exc.headers) from None
    return b"".join(chunks)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(the JSON request, the binary tensor data after it)."""
    if header_length is None:
        return body, b""
    length = header_length.strip()
    if not length.isdigit() or int(length) > len(body):
        raise V2Error(400, f"{HEADER_LENGTH} is {header_length!r}, not a length within the {len(body)}-byte body; "
                           "it must give the byte length of the JSON part", "bad_request")
    return body[: int(length)], body[int(length):]


def parse_request(header: bytes) -> InferRequest:
    try:
        payload = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise V2Error(400, f"the inference request is not JSON ({exc}); send {{\"inputs\": [{{\"name\": "
                           f"\"{INPUT_NAME}\", \"datatype\": \"{INPUT_DATATYPE}\", \"shape\": [...], \"data\": "
                           "[...]}]}", "bad_json") from None
    try:
        return InferRequest.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, error['loc'])) or 'the body'}: {error['msg']}"
                             for error in exc.errors()[:3])
        raise V2Error(400, f"not an inference request: {problems}", "bad_request") from None


def check_input(tensor: RequestInput, inputs: int, image_size: int, max_batch: int) -> int:
    """The batch size of a well-formed `image` input; V2Error naming what is wrong otherwise."""
    expected = f"[N, {image_size}, {image_size}, 1]"
    if inputs != 1 or tensor.name != INPUT_NAME:
        raise V2Error(400, f"this model takes one input '{INPUT_NAME}' ({INPUT_DATATYPE} {expected}); got "
                           f"{inputs} input(s), the first named '{tensor.name}'", "wrong_input")
    if tensor.datatype != INPUT_DATATYPE:
        raise V2Error(400, f"input '{INPUT_NAME}' must be {INPUT_DATATYPE} (preprocessed images, as "
                           f"Predictor.prepare returns them), got {tensor.datatype}", "wrong_datatype")
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [image_size, image_size, 1] or shape[0] < 1:
        raise V2Error(400, f"input '{INPUT_NAME}' must have shape {expected} with N >= 1 (this model's images are "
                           f"{image_size}x{image_size}, one channel), got {shape}", "wrong_shape")
    if shape[0] > max_batch:
        raise V2Error(413, f"{shape[0]} images in one request; send at most {max_batch} (serve.max_files)",
                      "too_large")
    return shape[0]


def binary_values(tensor: RequestInput, binary: bytes, count: int) -> np.ndarray:
    size = tensor.parameters.get("binary_data_size")
    if tensor.data is not None:
        raise V2Error(400, f"input '{INPUT_NAME}' has both binary_data_size and data; send one", "bad_request")
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary) or size != count:
        raise V2Error(400, f"input '{INPUT_NAME}' declares binary_data_size {size!r}; the body holds {len(binary)} "
                           f"bytes after the JSON header and shape {tensor.shape} needs {count}", "size_mismatch")
    return np.frombuffer(binary, dtype=np.uint8)


def json_values(tensor: RequestInput, count: int) -> np.ndarray:
    if tensor.data is None:
        raise V2Error(400, f"input '{INPUT_NAME}' has no data: send them in 'data' or as binary data "
                           "(parameters.binary_data_size)", "bad_request")
    try:
        values = np.asarray(tensor.data)
    except ValueError:  # ragged nesting
        raise V2Error(400, f"input '{INPUT_NAME}': data are nested unevenly; send them flat (row-major) or "
                           f"nested to the shape {tensor.shape}", "size_mismatch") from None
    if values.ndim != 1 and list(values.shape) != tensor.shape:
        raise V2Error(400, f"input '{INPUT_NAME}': data nested as {list(values.shape)} do not match the shape "
                           f"{tensor.shape}; send them flat (row-major) or nested to the shape", "size_mismatch")
    if values.size != count:
        raise V2Error(400, f"input '{INPUT_NAME}' has {values.size} values; shape {tensor.shape} needs {count}",
                      "size_mismatch")
    if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
        raise V2Error(400, f"input '{INPUT_NAME}' is {INPUT_DATATYPE}: data must be integers from 0 to 255",
                      "out_of_range")
    return values.astype(np.uint8)


def images_of(request: InferRequest, binary: bytes, image_size: int, max_batch: int) -> np.ndarray:
    """The request's images as (N, S, S, 1) uint8, ready for Predictor.probabilities."""
    tensor = request.inputs[0]
    batch = check_input(tensor, len(request.inputs), image_size, max_batch)
    count = math.prod(tensor.shape)
    if tensor.parameters and "binary_data_size" in tensor.parameters:
        values = binary_values(tensor, binary, count)
    elif binary:
        raise V2Error(400, f"{len(binary)} bytes of binary data follow the JSON header but input '{INPUT_NAME}' "
                           "declares no binary_data_size", "size_mismatch")
    else:
        values = json_values(tensor, count)
    return values.reshape(batch, image_size, image_size, 1)


def requested_outputs(request: InferRequest, available: list[str]) -> list[tuple[str, bool]]:
    """(output name, sent as binary data) for every output to send back, in the request's order (every output
    of the model when the request names none); V2Error for an output this model does not have."""
    default_binary = bool(request.parameters) and request.parameters.get("binary_data_output") is True
    if not request.outputs:
        return [(name, default_binary) for name in available]
    wanted = []
    for output in request.outputs:
        if output.name not in available:
            names = ", ".join(f"'{name}'" for name in available)
            raise V2Error(400, f"this model's outputs are {names}; '{output.name}' was requested", "wrong_output")
        binary = default_binary
        if output.parameters and "binary_data" in output.parameters:
            binary = output.parameters["binary_data"] is True
        wanted.append((output.name, binary))
    return wanted


def infer_response(request: InferRequest, values_by_name: dict[str, np.ndarray], wanted: list[tuple[str, bool]],
                   version: str) -> Response:
    outputs, blobs = [], []
    for name, binary in wanted:
        values = np.asarray(values_by_name[name], dtype="<f4")
        output: dict[str, Any] = {"name": name, "datatype": OUTPUT_DATATYPE, "shape": list(values.shape)}
        if binary:
            output["parameters"] = {"binary_data_size": values.nbytes}
            blobs.append(values.tobytes())
        else:
            output["data"] = values.ravel().tolist()  # float32 -> float: exact, so JSON loses nothing
        outputs.append(output)
    answer: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": version, "outputs": outputs}
    if request.id is not None:
        answer["id"] = request.id
    if not blobs:
        return JSONResponse(answer)
    header = json.dumps(answer).encode()
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


def run_inference(predictor: Predictor, body: bytes, header_length: str | None) -> tuple[Response, np.ndarray]:
    """Decode, check and predict one request (blocking: runs in a worker thread inside a prediction slot)."""
    header, binary = split_body(body, header_length)
    request = parse_request(header)
    wanted = requested_outputs(request, [output["name"] for output in output_tensors(predictor)])
    images = images_of(request, binary, predictor.image_size, predictor.serve_params.max_files)
    probabilities, maps = predictor.probabilities_and_maps(images, at_input_size=False)
    probabilities = np.asarray(probabilities).ravel()
    values = {OUTPUT_NAME: probabilities.reshape(-1, 1),
              CALIBRATED_OUTPUT: predictor.calibration.apply(probabilities).reshape(-1, 1)}
    if maps is not None:
        values[LESION_MAP_OUTPUT] = np.asarray(maps)[..., np.newaxis]
    return infer_response(request, values, wanted, version_of(predictor)), probabilities


# --- the routes ---------------------------------------------------------------------------------------------

router = APIRouter(prefix="/v2", tags=["open inference protocol (KServe v2)"])


@router.get("/health/live", summary="v2: is the server live?", response_model=ServerLive)
def server_live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="v2: is a model loaded?", response_model=ServerReady, responses=NOT_READY)
def server_ready(request: Request):
    if getattr(request.app.state, "draining", False):  # a stopping signal arrived (chestct.serving.shutdown)
        return V2Error(400, "not ready: shutting down, finishing the requests in flight", "shutting_down").response()
    if request.app.state.predictor is None:
        return V2Error(400, f"not ready: {request.app.state.unavailable}", "no_model").response()
    return {"ready": True}


@router.get("", summary="v2: server metadata", response_model=ServerMetadata)
def server_metadata(request: Request) -> dict:
    return {"name": MODEL_NAME, "version": request.app.version, "extensions": [BINARY_EXTENSION]}


def _metadata(request: Request, model_name: str, version: str | None):
    try:
        return model_metadata(loaded_model(request, model_name, version))
    except V2Error as exc:
        return exc.response()


def _ready(request: Request, model_name: str, version: str | None):
    try:
        loaded_model(request, model_name, version, unavailable_status=400)
    except V2Error as exc:
        return exc.response()
    return {"name": model_name, "ready": True}


@router.get("/models/{model_name}", summary="v2: model metadata (tensors, versions, threshold)",
            response_model=ModelMetadata, responses=UNKNOWN_MODEL | NO_MODEL)
def model_metadata_latest(request: Request, model_name: str):
    return _metadata(request, model_name, None)


@router.get("/models/{model_name}/versions/{model_version}", summary="v2: metadata of one model version",
            response_model=ModelMetadata, responses=UNKNOWN_MODEL | NO_MODEL)
def model_metadata_version(request: Request, model_name: str, model_version: str):
    return _metadata(request, model_name, model_version)


@router.get("/models/{model_name}/ready", summary="v2: is the model ready?", response_model=ModelReady,
            responses=UNKNOWN_MODEL | NOT_READY)
def model_ready_latest(request: Request, model_name: str):
    return _ready(request, model_name, None)


@router.get("/models/{model_name}/versions/{model_version}/ready", summary="v2: is this model version ready?",
            response_model=ModelReady, responses=UNKNOWN_MODEL | NOT_READY)
def model_ready_version(request: Request, model_name: str, model_version: str):
    return _ready(request, model_name, model_version)


async def _infer(request: Request, model_name: str, version: str | None) -> Response:
    metrics = request.app.state.metrics
    try:
        predictor = loaded_model(request, model_name, version)
        body = await read_body(request, predictor.serve_params, predictor.image_size)
        # Decoding the JSON and the model run happen in a worker thread inside a slot, as /predict's do.
        async with request.app.state.slots.hold():
            response, probabilities = await run_in_threadpool(run_inference, predictor, body,
                                                              request.headers.get(HEADER_LENGTH))
    except ClientDisconnect:
        client = request.client.host if request.client else "a client"
        log.info("chestct: %s disconnected before its inference request was complete; request dropped", client)
        return Response(status_code=400)  # never sent: the connection is gone
    except ServerBusyError as exc:
        log.warning("chestct: %s", exc)
        metrics.count_rejection(request, 503, "busy")
        return V2Error(503, str(exc), "busy", {"Retry-After": str(exc.retry_after_s)}).response()
    except V2Error as exc:
        metrics.count_rejection(request, exc.status_code, exc.reason)
        return exc.response()
    metrics.count_probabilities("v2", probabilities, predictor.threshold)
    return response


@router.post("/models/{model_name}/infer", summary="v2: probabilities for preprocessed images",
             response_model=InferResponse, responses=INFER_OK | INFER_ERRORS, openapi_extra=INFER_BODY)
async def infer_latest(request: Request, model_name: str):
    return await _infer(request, model_name, None)


@router.post("/models/{model_name}/versions/{model_version}/infer", summary="v2: infer with one model version",
             response_model=InferResponse, responses=INFER_OK | INFER_ERRORS, openapi_extra=INFER_BODY)
async def infer_version(request: Request, model_name: str, model_version: str):
    return await _infer(request, model_name, model_version)
