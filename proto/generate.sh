#!/usr/bin/env bash
# Regenerates the Python gRPC stubs in buffer/_proto/ from proto/.
# Run from anywhere; needs the dev extra (grpcio-tools). Never edit the output by hand:
# tests/unit/test_proto_stubs.py fails when the committed stubs drift from proto/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
cd "$root"
# The virtual include path makes the generated imports read `buffer._proto.…`.
python -m grpc_tools.protoc -Ibuffer/_proto=proto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/ingestbuffer/v1/ingest.proto
