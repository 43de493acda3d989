"""The FUSE filesystem: the tree, inodes and the pyfuse3 operations."""
