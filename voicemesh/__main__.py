import sys

from voicemesh.cli import main

sys.exit(main())
