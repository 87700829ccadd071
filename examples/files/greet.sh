#!/bin/sh
# Prints a greeting; used by examples/hello-busybox.kdl.
echo "${GREETING:-hi}, ${1:-world}!"
