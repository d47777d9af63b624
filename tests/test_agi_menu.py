"""The IVR self-service menu's pure state machine (agi/menu.py): no I/O, every path."""

from __future__ import annotations

import dataclasses

from agi.menu import (
    Ask,
    CheckPin,
    Do,
    End,
    Load,
    Menu,
    SavePin,
    SetAuto,
    TopUp,
    View,
    options_speech,
    setting_speech,
)
from agi.speech import Step
from prepaid.pins import PinCheck
from prepaid.selfservice import TopupResult

EUR = 1_000_000
PRESETS = (5 * EUR, 10 * EUR, 20 * EUR, 50 * EUR)
VIEW = View("EUR", 9_500_000, threshold=5 * EUR, action="topup", policy_enabled=True,
            topup_amount=20 * EUR, has_card=True, card_last4="4242")


def f(*names: str) -> tuple[Step, ...]:
    return tuple(("file", f"prepaid/{n}") for n in names)


def euros(n: int) -> tuple[Step, ...]:
    return (("number", n), ("file", "prepaid/currency-eur"))


def signed_in(view: View = VIEW) -> tuple[Menu, Ask]:
    menu = Menu(PRESETS)
    assert menu.start() == Do(Load())
    ask = menu.loaded(view)
    assert ask == Ask(f("enter-pin"), 8, pin=True)
    assert menu.keyed("1234") == Do(CheckPin("1234"))
    main = menu.pin_checked(PinCheck.OK)
    assert isinstance(main, Ask)
    return menu, main


def files(out: object) -> list[str]:
    assert isinstance(out, (Ask, Do, End))
    return [str(v) for k, v in out.speech if k == "file"]


def test_the_main_menu_says_balance_setting_and_the_presets_from_the_card() -> None:
    _, main = signed_in()
    assert main.digits == 1 and not main.pin
    assert main.speech == (
        *f("your-balance-is"), ("number", 9), ("file", "prepaid/currency-eur"),
        *f("and"), ("number", 50), *f("cents"),
        *f("when-below"), *euros(5), *f("we-add"), *euros(20), *f("from-your-card"),
        *f("to-add"), *euros(5), *f("from-card-ending"), ("digits", "4242"),
        *f("press"), ("digits", "1"),
        *euros(10), *f("press"), ("digits", "2"),
        *euros(20), *f("press"), ("digits", "3"),
        *euros(50), *f("press"), ("digits", "4"),
        *f("auto-off-option", "press"), ("digits", "7"),
        *f("change-pin-option", "press"), ("digits", "8"),
        *f("repeat-option", "press"), ("digits", "9"))


def test_a_preset_is_charged_only_after_the_caller_confirms() -> None:
    menu, _ = signed_in()
    confirm = menu.keyed("2")
    assert confirm == Ask((*f("you-chose"), *euros(10), *f("from-card-ending"),
                           ("digits", "4242"), *f("confirm-or-cancel")))
    assert menu.keyed("1") == Do(TopUp(10 * EUR), f("one-moment"))
    assert menu.topped_up(TopupResult("credited", 19_500_000)) == Do(Load())
    after = menu.loaded(dataclasses.replace(VIEW, balance=19_500_000))
    assert isinstance(after, Ask)
    assert after.speech[:3] == (*f("topup-done", "your-balance-is"), ("number", 19))


def test_any_other_key_at_the_confirmation_charges_nothing() -> None:
    for key in ("2", "", "#"):
        menu, _ = signed_in()
        menu.keyed("1")
        back = menu.keyed(key)
        assert isinstance(back, Ask) and files(back)[:2] == ["prepaid/not-charged",
                                                          "prepaid/your-balance-is"]


def test_each_outcome_of_a_top_up_has_its_prompt() -> None:
    said = {}
    for state in ("credited", "declined", "refused", "failed", "abandoned", "pending"):
        menu, _ = signed_in()
        menu.keyed("1")
        menu.keyed("1")
        assert menu.topped_up(TopupResult(state)) == Do(Load())
        said[state] = files(menu.loaded(VIEW))[0]
    assert said == {"credited": "prepaid/topup-done", "declined": "prepaid/card-declined",
                    "refused": "prepaid/topup-refused", "failed": "prepaid/topup-failed",
                    "abandoned": "prepaid/topup-try-later",
                    "pending": "prepaid/topup-pending"}


def test_three_wrong_pins_end_the_call() -> None:
    menu = Menu(PRESETS)
    menu.start()
    menu.loaded(VIEW)
    assert menu.keyed("0000") == Do(CheckPin("0000"))
    assert menu.pin_checked(PinCheck.WRONG) == Ask(f("pin-wrong", "enter-pin"), 8, pin=True)
    assert menu.keyed("") == Ask(f("pin-wrong", "enter-pin"), 8, pin=True)  # none: a try
    menu.keyed("1111")
    assert menu.pin_checked(PinCheck.WRONG) == End(f("pin-wrong", "goodbye"))


def test_a_locked_menu_or_no_pin_ends_the_call() -> None:
    menu = Menu(PRESETS)
    menu.start()
    menu.loaded(VIEW)
    menu.keyed("1234")
    assert menu.pin_checked(PinCheck.LOCKED) == End(f("pin-locked", "goodbye"))
    menu = Menu(PRESETS)
    menu.start()
    assert menu.loaded(dataclasses.replace(VIEW, has_pin=False)) == End(f("no-pin", "goodbye"))
    menu = Menu(PRESETS)
    menu.start()
    assert menu.loaded(None) == End(f("account-unknown"))


def test_the_pin_is_not_in_the_effect_repr() -> None:
    assert "1234" not in repr(CheckPin("1234")) + repr(SavePin("1234"))


def test_without_a_card_no_top_up_and_no_automatic_option_is_offered() -> None:
    menu, main = signed_in(dataclasses.replace(VIEW, has_card=False, card_last4="",
                                               action="email"))
    assert "prepaid/no-card" in files(main) and "prepaid/to-add" not in files(main)
    assert not any(k == "digits" and v == "7" for k, v in main.speech)
    for key in ("1", "7"):
        again = menu.keyed(key)
        assert isinstance(again, Ask) and files(again)[0] == "prepaid/invalid-choice"


def test_automatic_top_up_is_turned_on_and_off() -> None:
    off = dataclasses.replace(VIEW, action="email")
    menu, main = signed_in(off)
    assert "prepaid/auto-on-option" in files(main)
    assert menu.keyed("7") == Do(SetAuto(True))
    assert menu.auto_set(True) == Do(Load())
    assert files(menu.loaded(VIEW))[0] == "prepaid/auto-now-on"
    assert menu.keyed("7") == Do(SetAuto(False))
    menu.auto_set(True)
    assert files(menu.loaded(off))[0] == "prepaid/auto-now-off"
    menu.keyed("7")
    menu.auto_set(False)  # refused (no threshold or amount)
    assert files(menu.loaded(off))[0] == "prepaid/auto-not-set-up"


def test_a_new_pin_is_entered_twice() -> None:
    menu, _ = signed_in()
    assert menu.keyed("8") == Ask(f("enter-new-pin"), 8, pin=True)
    assert menu.keyed("4321") == Ask(f("repeat-new-pin"), 8, pin=True)
    assert menu.keyed("4321") == Do(SavePin("4321"))
    assert files(menu.pin_saved())[0] == "prepaid/pin-changed"
    menu.keyed("8")
    menu.keyed("4321")
    assert files(menu.keyed("4322"))[0] == "prepaid/pins-differ"
    menu.keyed("8")
    assert files(menu.keyed("12"))[0] == "prepaid/pin-invalid"


def test_silence_repeats_the_menu_twice_then_says_goodbye() -> None:
    menu, main = signed_in()
    assert menu.keyed("") == main
    assert menu.keyed("9") == main
    assert menu.keyed("") == main
    assert menu.keyed("") == main
    assert menu.keyed("") == End(f("goodbye"))


def test_the_low_balance_setting_in_words() -> None:
    email = dataclasses.replace(VIEW, action="email")
    assert setting_speech(email) == [*f("when-below"), *euros(5), *f("we-email-you")]
    for none in (dataclasses.replace(VIEW, action="none"),
                 dataclasses.replace(VIEW, policy_enabled=False),
                 dataclasses.replace(VIEW, threshold=0)):
        assert setting_speech(none) == list(f("no-low-balance-action"))


def test_at_most_six_presets_are_offered() -> None:
    menu = Menu(tuple(n * EUR for n in range(1, 10)))
    assert len(menu.presets) == 6
    said = options_speech(VIEW, menu.presets)
    assert [v for k, v in said if k == "digits"] == ["4242", "1", "2", "3", "4", "5", "6",
                                                     "7", "8", "9"]
