set -e
cd /work/main
date
/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-bench -m /work/llama/ar-q4_0.gguf -m /work/llama/ar-q8_0.gguf -m /work/llama/ar-f32.gguf -p 0 -n 16 -d 128,1024 -t 2 -r 3 -o json > docs/bench-int4-cpu/llama-bench.json
date
python -m maria_onnx.tools.compare_steps /work/runs/paper/fp32 /work/runs/paper/int4 docs/bench-int4-cpu/steps-fp32-int4.json --runs 20
python -m maria_onnx.tools.compare_steps /work/runs/paper/int8 /work/runs/paper/int4 docs/bench-int4-cpu/steps-int8-int4.json --runs 20
python /work/runs/heads.py > docs/bench-int4-cpu/fusion-heads.json
date
