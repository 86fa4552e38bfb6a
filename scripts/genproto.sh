#!/usr/bin/env bash
# Generate Python code (messages, gRPC stubs, mypy stubs) from proto/ into ghostcore/pb/.
# Usage: scripts/genproto.sh [OUTDIR]   (default: ghostcore/pb; CI generates into a temp dir and diffs)
#
# protoc writes imports as "from ghostmesh.v1 import ...", after the proto path. That would resolve to our
# ghostmesh *program* package, so the imports are rewritten to the package the code lives in.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-ghostcore/pb}
py=${PYTHON:-python}
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  --plugin=protoc-gen-mypy="$(dirname "$(command -v "$py")")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$(command -v "$py")")/protoc-gen-mypy_grpc" \
  proto/ghostmesh/v1/*.proto
find "$out" -name '*.py' -o -name '*.pyi' | xargs sed -i -E \
  -e 's/^from ghostmesh\.v1 import/from ghostcore.pb.ghostmesh.v1 import/' \
  -e 's/^import ghostmesh\.v1\.([a-z_0-9]+)$/import ghostcore.pb.ghostmesh.v1.\1/' \
  -e 's/([^.a-z_])ghostmesh\.v1\.([a-z_0-9]+_pb2)/\1ghostcore.pb.ghostmesh.v1.\2/g'
for d in "$out" "$out/ghostmesh" "$out/ghostmesh/v1"; do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done
