#!/usr/bin/env bash
# Print the path of llama.cpp's source tree (converter + gguf-py) from the llama-cpp-python 0.3.36 sdist.
set -euo pipefail
dest="${TMPDIR:-/tmp}/quantkit-llamacpp-src"
src="$dest/llama_cpp_python-0.3.36/vendor/llama.cpp"
if [ ! -f "$src/convert_hf_to_gguf.py" ]; then
  mkdir -p "$dest"
  python3 -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$dest" >&2
  tar xzf "$dest/llama_cpp_python-0.3.36.tar.gz" -C "$dest" \
    llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py \
    llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py \
    llama_cpp_python-0.3.36/vendor/llama.cpp/conversion
fi
echo "$src"
