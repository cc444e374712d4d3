"""Static checks of the Slicer module's GUI and packaging (no Slicer, no Qt needed).

* ``Resources/UI/UniversalSeg.ui`` is valid Qt Designer XML, and every widget the Widget class uses
  (``self.ui.<name>``) exists in it with a class the GUI code can use;
* widgets bound to the parameter node (``SlicerParameterName``) name a parameter of ``UniversalSegParameterNode``
  of a type that ``slicer.parameterNodeWrapper`` can connect to that widget class;
* the extension's CMake files, icons and catalog entry (the requirements it installs: test_slicer_dependencies.py).
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "UniversalSeg" / "UniversalSeg.py"
UI_FILE = REPO / "UniversalSeg" / "Resources" / "UI" / "UniversalSeg.ui"

# Widget classes the module's code relies on, by name (signals and properties it uses exist on these).
EXPECTED_CLASSES = {
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "segmentationShow3DButton": "qMRMLSegmentationShow3DButton",
    "classSearchBox": "ctkSearchBox",
    "classTreeWidget": "QTreeWidget",
    "promptTextEdit": "QTextEdit",
    "promptPreviewLabel": "QLabel",
    "modelComboBox": "QComboBox",
    "customModelPathLineEdit": "ctkPathLineEdit",
    "deviceComboBox": "QComboBox",
    "qualityComboBox": "QComboBox",
    "overlapSliderWidget": "ctkSliderWidget",
    "thresholdSliderWidget": "ctkSliderWidget",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "logTextEdit": "QPlainTextEdit",
}
# Which (widget class, parameter type) pairs slicer.parameterNodeWrapper's GUI connectors handle.
CONNECTABLE = {
    ("QCheckBox", "bool"),
    ("QComboBox", "choice"),
    ("ctkSliderWidget", "bounded float"),
    ("QDoubleSpinBox", "bounded float"),
    ("QTextEdit", "str"),
    ("QLineEdit", "str"),
    ("QSpinBox", "int"),
    ("qMRMLNodeComboBox", "node"),
}


# ------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def ui_tree() -> ET.ElementTree:
    return ET.parse(UI_FILE)  # raises on malformed XML


@pytest.fixture(scope="module")
def ui_widgets(ui_tree) -> dict[str, ET.Element]:
    widgets = {}
    for widget in ui_tree.getroot().iter("widget"):
        name = widget.get("name")
        assert name, f"a <widget class={widget.get('class')!r}> has no name"
        assert name not in widgets, f"widget name {name!r} is used twice"
        widgets[name] = widget
    return widgets


@pytest.fixture(scope="module")
def module_ast() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def ui_names_used(tree: ast.Module) -> set[str]:
    """Every ``<name>`` in ``self.ui.<name>`` in the module source."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def parameter_kinds(tree: ast.Module) -> dict[str, str]:
    """Fields of ``UniversalSegParameterNode`` -> "bool" | "str" | "int" | "choice" | "bounded float" | "node"."""
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "UniversalSegParameterNode")
    kinds = {}
    for statement in cls.body:
        if not isinstance(statement, ast.AnnAssign):
            continue
        annotation = ast.unparse(statement.annotation)
        if annotation.startswith("Annotated[str, Choice("):
            kinds[statement.target.id] = "choice"
        elif annotation.startswith("Annotated[float, WithinRange("):
            kinds[statement.target.id] = "bounded float"
        elif re.fullmatch(r"slicer\.vtkMRML\w+Node", annotation):
            kinds[statement.target.id] = "node"
        else:
            kinds[statement.target.id] = annotation
    return kinds


def string_property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            child = prop.find("string")
            return child.text if child is not None else None
    return None


# ---------------------------------------------------------------------------------------------------- .ui
def test_ui_file_is_a_qt_designer_form(ui_tree, ui_widgets):
    root = ui_tree.getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.findtext("class") == "UniversalSeg"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "UniversalSeg"
    declared = {}
    for custom in root.iter("customwidget"):
        assert custom.findtext("extends") and custom.findtext("header"), custom.findtext("class")
        declared[custom.findtext("class")] = custom.findtext("extends")
    for name, widget in ui_widgets.items():
        cls = widget.get("class")
        assert cls.startswith("Q") or cls in declared, f"{name}: custom class {cls} is not declared in <customwidgets>"
    for layout in root.iter("layout"):
        if layout.get("class") in ("QFormLayout", "QGridLayout"):
            for item in layout.findall("item"):
                assert item.get("row") is not None and item.get("column") is not None, layout.get("name")
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in ui_widgets and connection.findtext("receiver") in ui_widgets


def test_every_widget_the_code_uses_exists(ui_widgets, module_ast):
    used = ui_names_used(module_ast)
    assert len(used) > 15, "the Widget should use its .ui widgets through self.ui"
    missing = sorted(used - set(ui_widgets))
    assert not missing, f"UniversalSeg.py uses self.ui.{missing} but {UI_FILE.name} has no such widget"
    for name, cls in EXPECTED_CLASSES.items():
        assert name in ui_widgets, f"{name} is missing from the .ui"
        assert ui_widgets[name].get("class") == cls, f"{name} must be a {cls}"


def test_parameter_bound_widgets_match_the_parameter_node(ui_widgets, module_ast):
    kinds = parameter_kinds(module_ast)
    assert {
        "inputVolume",
        "outputSegmentation",
        "prompt",
        "device",
        "quality",
        "overlap",
        "threshold",
        "postprocess",
        "overwrite",
    } <= set(kinds)
    bound = {}
    for name, widget in ui_widgets.items():
        parameter = string_property(widget, "SlicerParameterName")
        if parameter is None:
            continue
        assert parameter in kinds, f"{name} is bound to unknown parameter {parameter!r}"
        assert parameter not in bound, f"parameter {parameter!r} is bound to two widgets"
        pair = (widget.get("class"), kinds[parameter])
        assert pair in CONNECTABLE, f"{name}: parameterNodeWrapper cannot connect a {pair[0]} to a {pair[1]} parameter"
        bound[parameter] = name
    # everything but the class picker, the model selector and the prompt (synchronised by the Widget's code) is
    # bound; the prompt QTextEdit must not be: the wrapper's QTextEdit connector resets the cursor on each key
    assert set(kinds) - set(bound) == {"classes", "model", "prompt"}


def test_prompt_and_class_picker_are_usable(ui_widgets):
    assert string_property(ui_widgets["promptTextEdit"], "placeholderText")
    acceptRichText = [p for p in ui_widgets["promptTextEdit"].findall("property") if p.get("name") == "acceptRichText"]
    assert acceptRichText and acceptRichText[0].findtext("bool") == "false"
    for button in (
        "presetAllOrgansButton",
        "presetAbdominalOrgansButton",
        "presetAllTumorsButton",
        "presetClearButton",
    ):
        assert string_property(ui_widgets[button], "text")
    assert string_property(ui_widgets["applyButton"], "text") == "Segment"


# ---------------------------------------------------------------------------------------------- packaging
def test_extension_cmake_and_metadata():
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^project\(UniversalSeg\)", top, re.M)
    assert re.search(r'set\(EXTENSION_CATEGORY "Segmentation"\)', top)
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', top)
    assert re.search(r"^add_subdirectory\(UniversalSeg\)", top, re.M)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL"):
        assert re.search(rf'set\({variable} "[^"]+"\)', top), variable
    module = (REPO / "UniversalSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    # (that the self-test is not a ctest is checked in test_slicer_dependencies.py)
    assert "slicerMacroBuildScriptedModule(" in module and "${MODULE_NAME}SlicerLib/*.py" in module
    entry = json.loads((REPO / "UniversalSegExtension" / "UniversalSeg.json").read_text(encoding="utf-8"))
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"] and entry["scm_url"]
    from PIL import Image

    for icon in (
        REPO / "UniversalSegExtension" / "UniversalSeg.png",
        REPO / "UniversalSeg" / "Resources" / "Icons" / "UniversalSeg.png",
    ):
        with Image.open(icon) as image:
            assert image.format == "PNG" and image.size == (128, 128), icon


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_module_cmake_packages_the_engine(tmp_path):
    """Configure UniversalSeg/CMakeLists.txt with stand-ins for Slicer's macros: every engine file is packaged."""
    (tmp_path / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.16)
project(Stub NONE)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
set(BUILD_TESTING ON)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${{ARGN}})
  foreach(f ${{MY_SCRIPTS}})
    if(IS_ABSOLUTE ${{f}})
      if(NOT EXISTS ${{f}})
        message(FATAL_ERROR "missing script ${{f}}")
      endif()
      file(RELATIVE_PATH f ${{CMAKE_CURRENT_BINARY_DIR}} ${{f}})
    elseif(NOT EXISTS ${{CMAKE_CURRENT_SOURCE_DIR}}/${{f}})
      message(FATAL_ERROR "missing script ${{f}}")
    endif()
    file(APPEND ${{CMAKE_BINARY_DIR}}/scripts.txt "${{f}}\\n")
  endforeach()
  foreach(f ${{MY_RESOURCES}})
    if(NOT EXISTS ${{CMAKE_CURRENT_SOURCE_DIR}}/${{f}})
      message(FATAL_ERROR "missing resource ${{f}}")
    endif()
  endforeach()
endmacro()
macro(slicer_add_python_unittest)
endmacro()
add_subdirectory({(REPO / "UniversalSeg").as_posix()} UniversalSeg)
""")
    build = tmp_path / "build"
    result = subprocess.run(["cmake", "-S", str(tmp_path), "-B", str(build)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    scripts = set((build / "scripts.txt").read_text().split())
    engine = REPO / "UniversalSegLib"
    package = REPO / "UniversalSeg" / "UniversalSegSlicerLib"
    expected = (
        {"UniversalSeg.py"}
        | {f"UniversalSegSlicerLib/{p.name}" for p in package.glob("*.py")}
        | {
            "UniversalSegLib/" + p.relative_to(engine).as_posix()
            for p in engine.rglob("*.py")
            if "__pycache__" not in p.parts
        }
    )
    assert {"UniversalSegSlicerLib/process.py", "UniversalSegSlicerLib/segments.py"} <= expected
    assert scripts == expected
    data = build / "lib" / "Slicer" / "qt-scripted-modules" / "UniversalSegLib" / "data"
    for name in ("classes.json", "models.json"):
        assert (data / name).read_bytes() == (engine / "data" / name).read_bytes()
