from .launch import launch

launch()  # returns when no zygote forked the kernel: it then runs in this process
from .app import main  # noqa: E402

main()
