#!/bin/sh
# The MPIJob workers' entrypoint (k8s/mpijob): an unprivileged sshd on port 2222 whose host key
# is made here, at container start, in the container's own /tmp. A key baked into an image
# layer would be the same on every worker of every cluster that pulls the image, and readable
# by anyone who can pull it: whoever holds it can impersonate any worker to the launcher.
# Arguments go to sshd (e.g. -t to check the configuration).
set -eu
umask 077
mkdir -p /tmp/ssh
rm -f /tmp/ssh/ssh_host_ed25519_key /tmp/ssh/ssh_host_ed25519_key.pub
ssh-keygen -q -t ed25519 -N '' -f /tmp/ssh/ssh_host_ed25519_key
exec /usr/sbin/sshd -De -f /home/pipeline/.sshd_config "$@"
