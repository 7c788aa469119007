"""Export deployable modules to ONNX and TensorRT, with numerical parity checked on every file."""

from export.onnx import OnnxRunner, to_onnx
from export.onnx_file import onnx_input_shape, read_metadata, require_batch_size, run_metadata
from export.parity import Parity, check_parity
from export.result import ExportResult
from export.tensorrt import TensorRTEngine, to_tensorrt

__all__ = ["ExportResult", "OnnxRunner", "Parity", "TensorRTEngine", "check_parity", "onnx_input_shape",
           "read_metadata", "require_batch_size", "run_metadata", "to_onnx", "to_tensorrt"]
