"""``hf-instruct-tune templates list|show NAME``."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("templates", help="List prompt templates or show one.",
                                   description="Built-in and plugin prompt templates.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="Names, stop tokens and descriptions.")
    show = actions.add_parser("show", help="A template's Jinja source and a rendered example.")
    show.add_argument("name", help="Template name or path to a .jinja file.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..chat_template import MODEL_TEMPLATE
    from ..errors import InputError
    from ..recipe import is_model_template
    from ..templating import TEMPLATES, get_template

    if args.action == "list":
        for name in TEMPLATES.names():
            template = TEMPLATES.get(name)
            print(f"{name:18} stop={template.stop:12} {template.description}")
        print(f"{MODEL_TEMPLATE:18} stop={'(its own)':12} The model's own chat template (the tokenizer's chat_template); "
              "the default for conversations. See `inspect --model M`.")
        return 0
    if is_model_template(args.name):
        raise InputError(f"'{args.name}' is the tokenizer's own chat template: see it rendered, token by token, with "
                         "`hf-instruct-tune inspect --data FILE --model M`", field="name")
    template = get_template(args.name)
    example = [{"role": "user", "content": "Classify the sentiment of this text.", "input": "I love rainy days."}]
    rendered = template.render_prompt(example, bos_token="<s>", eos_token="</s>")
    print(f"# {template.name}: {template.description}\n# stop token: {template.stop}   multi-turn: "
          f"{template.multi_turn}   from: {template.origin}\n")
    print(template.source)
    print("# rendered prompt for an example row (the response follows it, then the stop token):\n")
    print(rendered)
    return 0
