# Sourced by the bench/*.sh scripts for the GPU machine, from the repository root: offline, the allocator setting
# every stack shares, NVLink multicast off (see the device notes), the bundle from make_gpu_site.sh
# (${SITE_TGZ:-.gpu-site/site.tgz}) unpacked once into /tmp/site, and the package copied to ${PKG:-/tmp/pkg} in its
# installed layout (setup.cfg maps templates/ and cards/ into it); PYTHONPATH holds both. USE_INSTALLED=1 (a dry
# run on a machine with the package's requirements installed) skips the bundle.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -n "${USE_INSTALLED:-}" ] || [ -d /tmp/site/trl ] \
  || { mkdir -p /tmp/site && tar xzf ${SITE_TGZ:-.gpu-site/site.tgz} -C /tmp/site; }
PKG=${PKG:-/tmp/pkg}
rm -rf $PKG && mkdir -p $PKG && cp -r hf_instruct_tune $PKG/ && cp -r templates cards $PKG/hf_instruct_tune/
export PYTHONPATH=${USE_INSTALLED:+$PKG}; export PYTHONPATH=${PYTHONPATH:-/tmp/site:$PKG}
